using System.Text.Json;
using DistDiffusion.Coordinator.Cli;
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
