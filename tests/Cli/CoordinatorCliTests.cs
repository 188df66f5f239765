using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Imaging;

namespace DistDiffusion.Tests.Cli;

/// <summary>The coordinator's verbs end to end, in process; console output is captured per call.</summary>
[Collection(CliCollection.Name)]
public sealed class CoordinatorCliTests() : TempFolderTest("dd-cli")
{
    [Theory]
    [InlineData("train", "--recipe", "swissroll", "--out", "X", "--bogus")]
    [InlineData("train", "--recipe", "nope", "--out", "X")]
    [InlineData("train", "--recipe", "swissroll", "--out", "X", "--set", "timesteps=zero")]
    [InlineData("train", "--recipe", "swissroll", "--out", "X", "--set", "no-such-field=1")]
    [InlineData("train", "--recipe", "swissroll")]
    [InlineData("train", "--recipe", "swissroll", "--out", "X", "--steps", "-3")]
    [InlineData("train", "--recipe", "swissroll", "--out", "X", "--device", "tpu")]
    [InlineData("sample", "--checkpoint", "X", "--out", "a.gif")]
    [InlineData("sample", "--checkpoint", "X", "--out", "a.png", "--sampler", "euler")]
    [InlineData("sample", "--out", "a.png")]
    [InlineData("eval", "--checkpoint", "X", "--samples", "1")]
    [InlineData("frobnicate")]
    public void WrongFlagsOrValuesGiveOneLineAndExitCodeTwo(params string[] args)
    {
        var (code, _, err) = CliHarness.Run(args.Select(a => a == "X" ? Path.Combine(Path.GetTempPath(), "dd-missing-" + Guid.NewGuid()) : a).ToArray());
        Assert.Equal(2, code);
        var lines = err.Trim().Split('\n');
        Assert.Single(lines);
        Assert.StartsWith("error:", lines[0]);
    }

    [Fact]
    public void AWorkersUnknownSchedulingClassIsNamedInOneLine()
    {
        var oldErr = Console.Error;
        using var err = new StringWriter();
        Console.SetError(err);
        int code;
        try
        {
            code = DistDiffusion.Worker.WorkerCli.Run(["--coordinator", "http://127.0.0.1:1", "--cpu-scheduling", "fifo"]);
        }
        finally
        {
            Console.SetError(oldErr);
        }
        Assert.Equal(2, code);
        Assert.Equal("error: --cpu-scheduling fifo: expected batch or normal", err.ToString().Trim());
    }

    [Theory]
    [InlineData("1-x", "error: --cpu-affinity 1-x: '1-x' is not a CPU number (0-1023) or a range of them; expected e.g. 1 or 0-3,8")]
    [InlineData("3-1", "error: --cpu-affinity 3-1: range '3-1' ends before it starts")]
    [InlineData("1023", "error: --cpu-affinity 1023: CPU 1023 is not one this process may use ({0})")]
    public void AWorkersBadCpuListIsNamedInOneLine(string list, string expected)
    {
        var oldErr = Console.Error;
        using var err = new StringWriter();
        Console.SetError(err);
        int code;
        try
        {
            code = DistDiffusion.Worker.WorkerCli.Run(["--coordinator", "http://127.0.0.1:1", "--cpu-affinity", list]);
        }
        finally
        {
            Console.SetError(oldErr);
        }
        Assert.Equal(2, code);
        Assert.Equal(string.Format(System.Globalization.CultureInfo.InvariantCulture, expected, DistDiffusion.Worker.CpuAffinity.Format(DistDiffusion.Worker.CpuAffinity.Allowed())), err.ToString().Trim());
        // Refused before the worker changed anything of this (the test) process: its scheduling class is still the normal one.
        if (OperatingSystem.IsLinux())
            Assert.Equal(0, DistDiffusion.Worker.CpuScheduling.PolicyOf(Environment.ProcessId, Environment.ProcessId));
    }

    [Fact]
    public void CpuListsParseFormatAndSplitIntoBlocksOfTheirOwn()
    {
        Assert.Equal([0, 1, 2, 3, 8], DistDiffusion.Worker.CpuAffinity.Parse(" 2-3,0-1 , 8,3", "--x"));
        Assert.Equal("0-3,8,10-11", DistDiffusion.Worker.CpuAffinity.Format([11, 8, 0, 1, 2, 3, 10]));
        // Two workers of two threads on a cpuset 2-5: 2-3 and 4-5. Three such workers do not fit, one leaves CPUs free
        // (for other work): neither is pinned (the kernel places them).
        var blocks = DistDiffusion.Worker.CpuAffinity.Blocks([2, 3, 4, 5], 2, 2);
        Assert.NotNull(blocks);
        Assert.Equal(["2-3", "4-5"], blocks.Select(b => DistDiffusion.Worker.CpuAffinity.Format(b)));
        Assert.Null(DistDiffusion.Worker.CpuAffinity.Blocks([2, 3, 4, 5], 3, 2));
        Assert.Null(DistDiffusion.Worker.CpuAffinity.Blocks([2, 3, 4, 5], 1, 2));
    }

    [Fact]
    public void AnUnknownPinningModeIsAUsageError()
    {
        var (code, _, err) = CliHarness.Run("run", "--workers", "2", "--recipe", "swissroll", "--out", Path.Combine(Path.GetTempPath(), "never"), "--pin-workers", "numa");
        Assert.Equal(2, code);
        Assert.Contains("--pin-workers numa: expected auto or none", err);
    }

    [Fact]
    public void HelpIsAvailableOnEveryVerb()
    {
        foreach (var verb in new[] { "train", "sample", "eval" })
        {
            var (code, output, _) = CliHarness.Run(verb, "--help");
            Assert.Equal(0, code);
            Assert.Contains("--", output);
        }
    }

    [Fact]
    public void TrainSampleEvalAndResumeWorkEndToEnd()
    {
        var run = Path.Combine(Dir, "run");
        var (code, output, err) = CliHarness.Run("train", "--recipe", "swissroll", "--out", run, "--steps", "30",
            "--set", "hidden-size=32", "--set", "checkpoint-every=20", "--set", "sample-every=0", "--set", "timesteps=20", "--threads", "1");
        Assert.True(code == 0, err);
        Assert.Contains("trained swissroll to step 30", output);
        Assert.Equal(new long[] { 20, 30 }, CheckpointStore.List(run).Select(c => c.Step));
        Assert.True(File.Exists(Path.Combine(run, "recipe.json")));
        Assert.True(File.Exists(Path.Combine(run, "samples", "step-0000030.png")));

        // Training into a folder that already holds a run is refused (checkpoints are never overwritten).
        Assert.Equal(2, CliHarness.Run("train", "--recipe", "swissroll", "--out", run, "--steps", "5").Code);

        var npy = Path.Combine(Dir, "s.npy");
        (code, output, err) = CliHarness.Run("sample", "--checkpoint", run, "--n", "7", "--sampler", "ddim", "--steps", "5", "--out", npy);
        Assert.True(code == 0, err);
        using (var samples = Npy.Read(npy))
            Assert.Equal(new long[] { 7, 2 }, samples.shape);
        var png = Path.Combine(Dir, "s.png");
        (code, _, err) = CliHarness.Run("sample", "--checkpoint", Path.Combine(run, "checkpoints", "20"), "--n", "50", "--trajectory-every", "5", "--out", png);
        Assert.True(code == 0, err);
        Assert.True(PngReader.Read(png).Width > 0);
        Assert.True(File.Exists(Path.Combine(Dir, "s-trajectory.png")));
        // DDPM runs all T steps; asking for fewer is a usage error.
        Assert.Equal(2, CliHarness.Run("sample", "--checkpoint", run, "--n", "3", "--steps", "5", "--out", npy).Code);

        (code, output, err) = CliHarness.Run("eval", "--checkpoint", run, "--samples", "200");
        Assert.True(code == 0, err);
        Assert.Contains("sliced Wasserstein distance", output);

        // Resuming an older checkpoint into the same run would collide with step 30: refused, run untouched.
        (code, _, err) = CliHarness.Run("train", "--resume", Path.Combine(run, "checkpoints", "20"), "--steps", "40");
        Assert.Equal(2, code);
        Assert.Contains("not the latest", err);
        // Branching off into a new folder is fine.
        var branch = Path.Combine(Dir, "branch");
        (code, _, err) = CliHarness.Run("train", "--resume", Path.Combine(run, "checkpoints", "20"), "--out", branch, "--steps", "25", "--threads", "1");
        Assert.True(code == 0, err);
        Assert.Equal(25, CheckpointStore.Load(branch).Step);

        (code, output, err) = CliHarness.Run("train", "--resume", run, "--steps", "40", "--threads", "1");
        Assert.True(code == 0, err);
        Assert.Contains("to step 40", output);
        Assert.Equal(40, CheckpointStore.Load(run).Step);
    }

    [Fact]
    public void CorruptCheckpointIsReportedNotLoaded()
    {
        var run = Path.Combine(Dir, "bad");
        Assert.Equal(0, CliHarness.Run("train", "--recipe", "swissroll", "--out", run, "--steps", "3", "--set", "hidden-size=8", "--set", "timesteps=5", "--set", "sample-every=0").Code);
        var model = Path.Combine(run, "checkpoints", "3", "model.safetensors");
        var bytes = File.ReadAllBytes(model);
        bytes[^1] ^= 0xFF;
        File.WriteAllBytes(model, bytes);
        var (code, _, err) = CliHarness.Run("sample", "--checkpoint", run, "--n", "2", "--out", Path.Combine(Dir, "x.npy"));
        Assert.Equal(1, code);
        Assert.Contains("checksum", err);
        Assert.False(File.Exists(Path.Combine(Dir, "x.npy")));
    }
}

/// <summary>Console redirection is process-wide: CLI tests run one at a time.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class CliCollection
{
    public const string Name = "Cli";
}
