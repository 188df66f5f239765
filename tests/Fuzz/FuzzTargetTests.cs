using System.Diagnostics;
using DistDiffusion.Fuzz.Targets;

namespace DistDiffusion.Tests.Fuzz;

/// <summary>The fuzz targets run one at a time: two of them share one in-process coordinator, whose state they check after each input.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class FuzzCollection
{
    public const string Name = "fuzz";
}

/// <summary>
/// What AFL found, kept (docs/fuzzing.md): every file of fuzz/corpus/TARGET/ and fuzz/crashes/TARGET/ replayed through its
/// target in this process, and a short seeded mutation pass per target, so CI exercises every parser the fuzzer covers.
/// A crash is any exception other than the parser's documented errors, memory beyond its limits, training state changed
/// by an invalid input, or an input that takes longer than <see cref="SlowInput"/>.
/// </summary>
[Collection(FuzzCollection.Name)]
public sealed class FuzzTargetTests
{
    private static readonly TimeSpan SlowInput = TimeSpan.FromSeconds(10);

    public static TheoryData<string> Targets => new(AllTargets.Names);

    private static List<string> Files(string target, string kind)
    {
        var dir = Repository.PathOf($"fuzz/{kind}/{target}");
        return Directory.Exists(dir) ? Directory.EnumerateFiles(dir).Order(StringComparer.Ordinal).ToList() : [];
    }

    private static void Run(FuzzTarget target, byte[] input, string what)
    {
        var clock = Stopwatch.StartNew();
        try
        {
            target.Execute(input);
        }
#pragma warning disable CA1031 // any crash fails the test, with the input that caused it
        catch (Exception e)
#pragma warning restore CA1031
        {
            Assert.Fail($"{target.Name}: {what} crashed:\n{e}");
        }
        Assert.True(clock.Elapsed < SlowInput, $"{target.Name}: {what} took {clock.Elapsed.TotalSeconds:F1} s (a hang?)");
    }

    [Theory(Timeout = 300_000)]
    [MemberData(nameof(Targets))]
    public async Task EveryCorpusAndCrashFileReplaysWithoutACrash(string name)
    {
        await Task.Yield();
        var target = AllTargets.Create(name);
        var corpus = Files(name, "corpus");
        Assert.True(corpus.Count > 0, $"fuzz/corpus/{name}/ is empty: run `dotnet DistDiffusion.Fuzz.dll seeds {name} fuzz/corpus/{name}` or scripts/fuzz.sh");
        var accepted = 0;
        foreach (var file in corpus.Concat(Files(name, "crashes")))
        {
            Run(target, File.ReadAllBytes(file), Path.GetRelativePath(Repository.Root, file));
            if (target.LastAccepted) accepted++;
        }
        // Some input gets past every check: the corpus reaches the end of the parser, not only its first refusal.
        Assert.True(accepted > 0, $"{name}: no corpus input was accepted whole");
    }

    /// <summary>Mutants per target: the in-process coordinator's targets cost a few milliseconds an input, the others well under one.</summary>
    private static int MutantsFor(string name) => name is "step" or "socket-coordinator" or "socket-worker" ? 400 : 2000;

    [Theory(Timeout = 300_000)]
    [MemberData(nameof(Targets))]
    public async Task SeededMutantsOfTheCorpusDoNotCrash(string name)
    {
        await Task.Yield();
        var target = AllTargets.Create(name);
        var corpus = Files(name, "corpus").Select(File.ReadAllBytes).ToList();
        Assert.NotEmpty(corpus);
        var mutator = new Mutator(31 * 1000 + name.Length);
        var outcomes = new HashSet<string>(StringComparer.Ordinal);
        for (var i = 0; i < MutantsFor(name); i++)
        {
            var input = mutator.Mutate(corpus);
            Run(target, input, $"mutant {i} (seed {31 * 1000 + name.Length}, {input.Length} bytes: {Convert.ToHexString(input.AsSpan(0, Math.Min(input.Length, 48)))}...)");
            outcomes.Add(target.LastOutcome);
        }
        // The mutants reach more than one way out of the parser (it is exercised, not refused at its first byte every time).
        Assert.True(outcomes.Count > 1, $"{name}: every mutant came to {string.Join(", ", outcomes)}");
    }

    /// <summary>The harness itself: an undocumented exception, and memory past a target's limit, are crashes.</summary>
    [Fact]
    public void TheHarnessReportsAnUnexpectedExceptionAndMemoryPastTheLimit()
    {
        var throwing = new ProbeTarget(input => _ = input[input.Length]);
        Assert.Throws<IndexOutOfRangeException>(() => throwing.Execute([1, 2, 3]));
        var documented = new ProbeTarget(_ => throw new InvalidDataException("bad input: expected something else"));
        documented.Execute([1]);
        Assert.StartsWith("InvalidDataException: bad input", documented.LastOutcome, StringComparison.Ordinal);
        var silent = new ProbeTarget(_ => throw new InvalidDataException(" "));
        Assert.Throws<FuzzFindingException>(() => silent.Execute([1]));
        var greedy = new ProbeTarget(input => GC.KeepAlive(new byte[input.Length * 1000]));
        var e = Assert.Throws<FuzzFindingException>(() => greedy.Execute(new byte[1000]));
        Assert.Contains("more than the", e.Message, StringComparison.Ordinal);
    }

    private sealed class ProbeTarget(Action<byte[]> run) : FuzzTarget
    {
        public override string Name => "probe";
        protected override void Run(byte[] input) => run(input);
        protected override bool Expected(Exception e) => e is InvalidDataException;
        protected override long AllocationLimit(byte[] input) => 100L * input.Length + (64 << 10);
        public override IEnumerable<(string Name, byte[] Bytes)> Seeds() => [];
    }
}
