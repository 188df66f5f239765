using System.Diagnostics;

namespace DistDiffusion.Fuzz.Targets;

/// <summary>
/// Raised by a target when an input broke a promise that no exception shows: memory beyond the declared limits, training
/// state changed by an invalid input, an answer that contradicts the input. Like an unexpected exception, it is a crash.
/// </summary>
public sealed class FuzzFindingException(string message) : Exception(message);

/// <summary>
/// One parser fed outside bytes. <see cref="Execute"/> runs one input: the parser's documented errors (each target names
/// them in <see cref="Expected"/>) are swallowed, anything else escapes and is a crash; so does an input that allocates more
/// than <see cref="AllocationLimit"/> on the calling thread (GC.GetAllocatedBytesForCurrentThread).
/// </summary>
public abstract class FuzzTarget
{
    /// <summary>The name on scripts/fuzz.sh's command line and the folder under fuzz/corpus/ and fuzz/crashes/.</summary>
    public abstract string Name { get; }

    /// <summary>Runs the parser on one input; lets every exception escape.</summary>
    protected abstract void Run(byte[] input);

    /// <summary>Whether <paramref name="e"/> is one of the errors the parser documents for bad input.</summary>
    protected abstract bool Expected(Exception e);

    /// <summary>The most managed memory <paramref name="input"/> may allocate on the calling thread (harness included).</summary>
    protected abstract long AllocationLimit(byte[] input);

    /// <summary>Whether the input's work runs on other threads too (a coordinator's): allocation is then counted process-wide.</summary>
    protected virtual bool AllThreads => false;

    /// <summary>Inputs that reach deep into the parser: the first corpus (scripts/fuzz.sh writes them to fuzz/corpus/NAME/ when it is empty).</summary>
    public abstract IEnumerable<(string Name, byte[] Bytes)> Seeds();

    /// <summary>Runs one input; throws on a crash (an unexpected exception, or a <see cref="FuzzFindingException"/>).</summary>
    public void Execute(byte[] input)
    {
        ArgumentNullException.ThrowIfNull(input);
        LastAccepted = false;
        var before = AllThreads ? GC.GetTotalAllocatedBytes() : GC.GetAllocatedBytesForCurrentThread();
        try
        {
            _note = null;
            Run(input);
            LastOutcome = _note ?? "accepted";
            LastAccepted = true;
        }
        catch (Exception e) when (Expected(e))
        {
            LastOutcome = $"{e.GetType().Name}: {e.Message.Split('\n')[0]}";
            if (string.IsNullOrWhiteSpace(e.Message))
                throw new FuzzFindingException($"{Name}: a {e.GetType().Name} without a message");
        }
        var allocated = (AllThreads ? GC.GetTotalAllocatedBytes() : GC.GetAllocatedBytesForCurrentThread()) - before;
        var limit = AllocationLimit(input);
        if (allocated > limit)
            throw new FuzzFindingException($"{Name}: an input of {input.Length} bytes allocated {allocated} bytes {(AllThreads ? "in all" : "on this thread")}, more than the {limit} its limits allow");
    }

    /// <summary>What the last input came to: "accepted", or the expected error's type and first line.</summary>
    public string LastOutcome { get; private set; } = "";

    /// <summary>Whether the last input ran to the end without a documented error.</summary>
    public bool LastAccepted { get; private set; }

    [ThreadStatic] private static string? _note;

    /// <summary>Says what an input that raised nothing came to (a refused stream's status, say), for replay's DD_FUZZ_VERBOSE=1.</summary>
    protected static void Note(string note) => _note = note;

    /// <summary>A scratch folder of this process (tmpfs when there is one), for parsers that read files.</summary>
    public static string Scratch(string name)
    {
        var root = Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath();
        var dir = Path.Combine(root, $"dd-fuzz-{Environment.ProcessId}-{name}");
        Directory.CreateDirectory(dir);
        return dir;
    }

    /// <summary>Removes this process's scratch folders (at exit).</summary>
    public static void CleanScratch()
    {
        var root = Directory.Exists("/dev/shm") ? "/dev/shm" : Path.GetTempPath();
        foreach (var dir in Directory.EnumerateDirectories(root, $"dd-fuzz-{Environment.ProcessId}-*"))
        {
            try { Directory.Delete(dir, recursive: true); } catch (IOException) { /* best effort */ }
        }
    }

    [StackTraceHidden]
    protected static void Check(bool ok, string what)
    {
        if (!ok) throw new FuzzFindingException(what);
    }
}
