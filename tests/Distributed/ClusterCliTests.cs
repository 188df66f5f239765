using System.Text.Json;
using DistDiffusion.Model.Checkpoints;

namespace DistDiffusion.Tests.Distributed;

/// <summary>`coordinator run` and `coordinator status` as users call them.</summary>
[Collection(ClusterCollection.Name)]
public sealed class ClusterCliTests() : TempFolderTest("dd-clustercli")
{


    [Fact(Timeout = 180_000)]
    public async Task RunStartsWorkerProcessesAndTrainsToTheOneProcessResult()
    {
        await Task.Yield();
        const int steps = 15;
        var runDir = Path.Combine(Dir, "run");
        var (code, output, err) = CliHarness.Run(["run", "--workers", "2", "--recipe", "swissroll", "--seed", "11", "--steps", $"{steps}", "--out", runDir,
            .. Cluster.Sets().SelectMany(s => new[] { "--set", s })]);
        Assert.True(code == 0, err);
        Assert.Contains("with 2 workers", output, StringComparison.Ordinal);
        var token = Path.Combine(runDir, "token");
        Assert.True(File.Exists(token));
        if (!OperatingSystem.IsWindows()) Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(token));
        var reference = Cluster.LocalReference(Cluster.Recipe(steps), Path.Combine(Dir, "local"));
        var actual = Cluster.Latest(runDir);
        try
        {
            Cluster.AssertSameState(reference, actual, err);
        }
        finally
        {
            reference.DisposeTensors();
            actual.DisposeTensors();
        }
    }

    public static TheoryData<string> BitwiseRecipes => ["swissroll", "mnist-small"];

    /// <summary>
    /// The bitwise promise, as users run it: `train` on 1 and 2 threads and `run` with 1 and 3 workers write the same
    /// model, EMA and optimizer files, byte for byte. mnist-small is the U-Net, whose libtorch kernels give other bits on
    /// other thread counts unless pinned (see ThreadInvarianceTests).
    /// </summary>
    [Theory(Timeout = 300_000)]
    [MemberData(nameof(BitwiseRecipes))]
    public async Task TrainAndRunWriteIdenticalFilesForAnyThreadOrWorkerCount(string recipe)
    {
        string[] common = recipe == "swissroll"
            ? ["--recipe", recipe, "--seed", "11", "--steps", "12", .. Cluster.Sets().SelectMany(s => new[] { "--set", s })]
            : ["--recipe", recipe, "--seed", "11", "--steps", "3", "--set", "batch-size=24", "--set", "micro-batches=4", "--set", "base-channels=8",
               "--set", "group-norm-groups=4", "--set", "checkpoint-every=0", "--set", "sample-every=0"];
        var runs = new (string Name, string[] Args)[]
        {
            ("train-1-thread", ["train", "--threads", "1"]),
            ("train-2-threads", ["train", "--threads", "2"]),
            ("run-1-worker", ["run", "--workers", "1"]),
            ("run-3-workers", ["run", "--workers", "3", "--worker-threads", "1"]),
        };
        foreach (var (name, args) in runs)
        {
            using var p = new CoordinatorProcess([.. args, "--out", Path.Combine(Dir, name), .. common]);
            await p.Process.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(120));
            Assert.True(p.Process.ExitCode == 0, $"{name} exited with {p.Process.ExitCode}\n{p.Output}");
        }
        foreach (var (name, _) in runs.Skip(1))
            Cluster.AssertIdenticalFiles(Path.Combine(Dir, runs[0].Name), Path.Combine(Dir, name));
    }

    /// <summary>`run`'s checkpoint retention flags reach the coordinator's loop (a real worker process).</summary>
    [Fact(Timeout = 180_000)]
    public async Task RunKeepsOnlyTheCheckpointsItIsAskedToKeep()
    {
        await Task.Yield();
        var runDir = Path.Combine(Dir, "run");
        var (code, _, err) = CliHarness.Run(["run", "--workers", "1", "--recipe", "swissroll", "--steps", "8", "--out", runDir,
            .. Cluster.Sets(checkpointEvery: 2).SelectMany(s => new[] { "--set", s }), "--keep-checkpoints", "1", "--keep-every", "4"]);
        Assert.True(code == 0, err);
        Assert.Equal([4L, 8L], CheckpointStore.List(runDir).Select(c => c.Step));
    }

    [Fact(Timeout = 60_000)]
    public async Task StatusShowsTheRunAndItsWorkersAndFailsClearlyWhenUnreachable()
    {
        await using var server = await Cluster.Start(Cluster.Options(Path.Combine(Dir, "run"), steps: 5));
        await using var w = await RawWorker.JoinAsync(server.Address);
        await w.NextAssignmentAsync();
        var tokenFile = Path.Combine(Dir, "token");
        DistDiffusion.Protocol.Token.WriteFile(tokenFile, Cluster.Token);

        var (code, output, err) = CliHarness.Run("status", "--address", server.Address.ToString(), "--token-file", tokenFile);
        Assert.True(code == 0, err);
        Assert.Contains("recipe swissroll", output, StringComparison.Ordinal);
        Assert.Contains(w.Welcome.WorkerId, output, StringComparison.Ordinal);
        Assert.Contains("busy", output, StringComparison.Ordinal);

        (code, output, err) = CliHarness.Run("status", "--address", server.Address.ToString(), "--token-file", tokenFile, "--json");
        Assert.True(code == 0, err);
        using var doc = JsonDocument.Parse(output);
        Assert.Equal("swissroll", doc.RootElement.GetProperty("recipe").GetString());
        Assert.Equal(w.Welcome.WorkerId, doc.RootElement.GetProperty("workers")[0].GetProperty("id").GetString());

        (code, _, err) = CliHarness.Run("status", "--address", server.Address.ToString());
        Assert.Equal(1, code);
        Assert.Contains("refused the token", err, StringComparison.Ordinal);

        (code, _, err) = CliHarness.Run("status", "--address", $"http://127.0.0.1:{Cluster.FreePort()}", "--timeout", "5");
        Assert.Equal(1, code);
        Assert.Contains("cannot reach the coordinator", err, StringComparison.Ordinal);

        (code, _, err) = CliHarness.Run("status", "--address", "not-a-url");
        Assert.Equal(2, code);
        Assert.Contains("--address not-a-url", err, StringComparison.Ordinal);
    }

    [Fact]
    public void ServeWithoutATokenRefusesToStart()
    {
        var saved = Environment.GetEnvironmentVariable(DistDiffusion.Protocol.Names.TokenEnvironmentVariable);
        Environment.SetEnvironmentVariable(DistDiffusion.Protocol.Names.TokenEnvironmentVariable, null);
        try
        {
            var (code, _, err) = CliHarness.Run("serve", "--recipe", "swissroll", "--out", Path.Combine(Dir, "x"), "--listen", "http://127.0.0.1:0");
            Assert.Equal(2, code);
            Assert.Contains("--allow-unauthenticated", err, StringComparison.Ordinal);
            (code, _, err) = CliHarness.Run("serve", "--recipe", "swissroll", "--out", Path.Combine(Dir, "x"), "--step-deadline", "-1", "--allow-unauthenticated");
            Assert.Equal(2, code);
            Assert.Contains("step deadline", err, StringComparison.Ordinal);
        }
        finally
        {
            Environment.SetEnvironmentVariable(DistDiffusion.Protocol.Names.TokenEnvironmentVariable, saved);
        }
    }
}
