using DistDiffusion.Bench;

namespace DistDiffusion.Tests.Cli;

/// <summary>The benchmarks live in `bench`, not in the product's `coordinator`: the verbs, their usage errors, the executables they start.</summary>
[Collection(CliCollection.Name)]
public sealed class BenchCliTests
{
    private static readonly string[] Verbs = ["exchange", "soak", "timeline", "straggler", "chaos", "eval"];

    [Fact]
    public void CoordinatorHelpListsNoBenchmarkAndBenchListsEveryOne()
    {
        var (code, output, _) = CliHarness.Run("--help");
        Assert.Equal(0, code);
        Assert.Contains("train", output, StringComparison.Ordinal);
        Assert.DoesNotContain("benchmark", output, StringComparison.OrdinalIgnoreCase);
        Assert.Equal(2, CliHarness.Run("benchmark-exchange").Code);

        (code, output, _) = Run("--help");
        Assert.Equal(0, code);
        foreach (var verb in Verbs) Assert.Contains("  " + verb + " ", output, StringComparison.Ordinal);
        Assert.Equal(Verbs.Order(), BenchCli.Build().Subcommands.Select(c => c.Name).Order());
    }

    [Theory]
    [InlineData("timeline", "--steps", "10", "--skip", "20")]
    [InlineData("timeline", "--workers", "0")]
    [InlineData("straggler", "--rounds", "0")]
    [InlineData("soak", "--reference-step", "0")]
    [InlineData("exchange", "--warmup", "0")]
    [InlineData("exchange", "--transport", "pigeon")]
    [InlineData("chaos", "--workers", "1")]
    [InlineData("eval", "--bpd-images", "0")]
    [InlineData("benchmark-soak")]
    public void WrongFlagsOrValuesGiveOneLineAndExitCodeTwo(params string[] args)
    {
        var (code, _, err) = Run(args);
        Assert.Equal(2, code);
        var lines = err.Trim().Split('\n');
        Assert.Single(lines);
        Assert.StartsWith("error:", lines[0]);
    }

    [Fact]
    public void TheExecutablesTheVerbsStartAreBesideBench()
    {
        // bench/bin/Release/net10.0 and this test's output folder alike: `coordinator` (run, serve) and `worker` are there.
        foreach (var name in new[] { "bench", "coordinator", "worker" })
            Assert.True(File.Exists(Path.Combine(AppContext.BaseDirectory, name)) || File.Exists(Path.Combine(AppContext.BaseDirectory, name + ".dll")), name);
        var psi = DistDiffusion.Coordinator.Cli.RunCommand.StartInfo("coordinator", ["--help"]);
        using var process = System.Diagnostics.Process.Start(psi)!;
        var output = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        Assert.Equal(0, process.ExitCode);
        Assert.DoesNotContain("benchmark", output, StringComparison.OrdinalIgnoreCase);
    }

    private static (int Code, string Out, string Err) Run(params string[] args) => CliHarness.Capture(() => BenchCli.Run(args));
}
