using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net.Sockets;
using System.Net;
using DistDiffusion.Coordinator.Access;
using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Hosting;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Training;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Distributed;

/// <summary>Tests that start real servers and worker processes run one at a time (2 cores; per-test timeouts).</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class ClusterCollection
{
    public const string Name = "cluster";
}

/// <summary>A process of ours with its output kept for failure messages; disposing kills it and everything it started.</summary>
internal abstract class KeptOutputProcess : IDisposable
{
    private readonly ConcurrentQueue<string> _lines = new();

    protected KeptOutputProcess(ProcessStartInfo psi)
    {
        Process = Process.Start(psi)!;
        Process.OutputDataReceived += (_, e) => { if (e.Data is not null) _lines.Enqueue(e.Data); };
        Process.ErrorDataReceived += (_, e) => { if (e.Data is not null) _lines.Enqueue(e.Data); };
        Process.BeginOutputReadLine();
        Process.BeginErrorReadLine();
    }

    public Process Process { get; }
    public string Output => string.Join("\n", _lines);

    public void Kill()
    {
        if (!Process.HasExited) Process.Kill(entireProcessTree: true);
        Process.WaitForExit(10_000);
    }

    public void Dispose()
    {
        Kill();
        Process.Dispose();
    }
}

/// <summary>A worker process (the real `worker` executable), given <paramref name="token"/> as DISTDIFFUSION_TOKEN and any other <paramref name="environment"/>.</summary>
internal sealed class WorkerProcess(Uri coordinator, string? token, int threads = 1, IReadOnlyDictionary<string, string>? environment = null, params string[] extra)
    : KeptOutputProcess(StartInfo(coordinator, token, threads, environment, extra))
{
    public WorkerProcess(Uri coordinator, string? token, int threads, params string[] extra) : this(coordinator, token, threads, null, extra)
    {
    }

    private static ProcessStartInfo StartInfo(Uri coordinator, string? token, int threads, IReadOnlyDictionary<string, string>? environment, string[] extra)
    {
        var psi = RunCommand.WorkerStartInfo(["--coordinator", coordinator.ToString(), "--threads", threads.ToString(System.Globalization.CultureInfo.InvariantCulture), "--log-level", "debug", .. extra]);
        Cluster.ClearTokenVariables(psi);
        if (token is not null) psi.Environment[Names.TokenEnvironmentVariable] = token;
        foreach (var (key, value) in environment ?? new Dictionary<string, string>()) psi.Environment[key] = value;
        return psi;
    }
}

/// <summary>`coordinator VERB ...` as its own process (the executable beside the tests).</summary>
/// <param name="args">The command line after `coordinator`.</param>
/// <param name="ignoringInterrupt">Start it with SIGINT ignored, as a shell without job control (any script) starts a
/// background job (`coordinator run ... &amp;`); the process is still this one (sh execs it).</param>
internal sealed class CoordinatorProcess(string[] args, bool ignoringInterrupt = false) : KeptOutputProcess(StartInfo(args, ignoringInterrupt))
{
    private static ProcessStartInfo StartInfo(string[] args, bool ignoringInterrupt)
    {
        var psi = RunCommand.StartInfo("coordinator", args);
        Cluster.ClearTokenVariables(psi);
        if (ignoringInterrupt)
        {
            string[] command = [psi.FileName, .. psi.ArgumentList];
            psi.FileName = "/bin/sh";
            psi.ArgumentList.Clear();
            foreach (var a in (string[])["-c", "trap '' INT; exec \"$0\" \"$@\"", .. command]) psi.ArgumentList.Add(a);
        }
        return psi;
    }
}

/// <summary>Processes as Linux's /proc shows them (for tests about which processes are left).</summary>
internal static class ProcessTable
{
    /// <summary>A process: its id and its start time (ids are reused).</summary>
    public readonly record struct Entry(int Pid, long StartTime);

    /// <summary>The live (not zombie) children of <paramref name="parent"/>.</summary>
    public static List<Entry> Children(int parent)
    {
        var children = new List<Entry>();
        foreach (var dir in Directory.EnumerateDirectories("/proc"))
            if (int.TryParse(Path.GetFileName(dir), out var pid) && Read(pid) is { } s && s.Parent == parent && s.Live)
                children.Add(new Entry(pid, s.StartTime));
        return children;
    }

    /// <summary>Whether the process still runs: gone, a zombie (exited, not yet reaped) or a new process under the same id all count as not.</summary>
    public static bool Running(Entry e) => Read(e.Pid) is { } s && s.StartTime == e.StartTime && s.Live;

    /// <summary>Sends a signal by name (INT, TERM, ...) with kill(1).</summary>
    public static async Task Signal(int pid, string name)
    {
        using var kill = Process.Start("kill", ["-" + name, pid.ToString(System.Globalization.CultureInfo.InvariantCulture)]);
        await kill.WaitForExitAsync();
        Assert.True(kill.ExitCode == 0, $"kill -{name} {pid} failed");
    }

    private static (int Parent, long StartTime, bool Live)? Read(int pid)
    {
        string stat;
        try
        {
            stat = File.ReadAllText($"/proc/{pid}/stat");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return null;   // gone
        }
        // "pid (comm) state ppid ... starttime ...": comm may hold spaces and parentheses, so count from the last ')'.
        var fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
        return (int.Parse(fields[1], System.Globalization.CultureInfo.InvariantCulture), long.Parse(fields[19], System.Globalization.CultureInfo.InvariantCulture), fields[0] is not ("Z" or "X"));
    }
}

internal static class Cluster
{
    public const string Token = "cluster-test-token-7f3a";

    /// <summary>A small, fast swiss-roll run: 61 samples in 8 micro-batches, so that slices over 2 and 3 workers are uneven.</summary>
    public static string[] Sets(int checkpointEvery = 0) =>
    [
        "hidden-size=32", "batch-size=61", "synthetic-size=500", "timesteps=50", $"checkpoint-every={checkpointEvery}", "sample-every=0", "ema-decay=0.9",
        "micro-batches=8",
    ];

    public static Recipe Recipe(int steps, int checkpointEvery = 0) =>
        Recipes.Get("swissroll").WithOverrides(Sets(checkpointEvery)) with { Steps = steps, Seed = 11 };

    public static CoordinatorOptions Options(string runDir, int steps, int minWorkers = 1, int checkpointEvery = 0) => new()
    {
        Listen = "http://127.0.0.1:0",
        Out = runDir,
        Recipe = "swissroll",
        Set = Sets(checkpointEvery),
        Steps = steps,
        Seed = 11,
        MinWorkers = minWorkers,
        StepDeadlineSeconds = 60,
        HeartbeatSeconds = 1,
    };

    public static Task<CoordinatorServer> Start(CoordinatorOptions options, string? token = Token) =>
        CoordinatorServer.StartAsync(options, token, Serilog.Events.LogEventLevel.Warning);

    /// <summary>A child process inherits none of the test runner's token variables.</summary>
    public static void ClearTokenVariables(ProcessStartInfo psi)
    {
        foreach (var name in new[] { Names.TokenEnvironmentVariable, Names.WorkerTokenEnvironmentVariable, Names.ClientTokenEnvironmentVariable })
            psi.Environment.Remove(name);
    }

    /// <summary>Role tokens for tests of who may call what.</summary>
    public const string WorkerToken = "cluster-test-worker-token-91c2";
    public const string ClientToken = "cluster-test-client-token-4e7b";

    public static Task<CoordinatorServer> Start(CoordinatorOptions options, ServerCredentials credentials) =>
        CoordinatorServer.StartAsync(options, credentials, Serilog.Events.LogEventLevel.Warning);

    /// <summary>Polls until <paramref name="condition"/> holds, failing with <paramref name="what"/> (and the diagnostics) after the timeout.</summary>
    public static async Task WaitUntil(Func<bool> condition, TimeSpan timeout, string what, Func<string>? diagnostics = null)
    {
        var clock = Stopwatch.StartNew();
        while (!condition())
        {
            if (clock.Elapsed > timeout)
                Assert.Fail($"timed out after {timeout.TotalSeconds:F0} s waiting for {what}\n{diagnostics?.Invoke()}");
            await Task.Delay(50);
        }
    }

    /// <summary>The step a coordinator reports, or 0 while it cannot be reached.</summary>
    public static ulong Step(Uri address, string token)
    {
        using var channel = ClientChannel.Create(address);
        try
        {
            return new Coordination.CoordinationClient(channel).GetStatus(new GetStatusRequest(), DistDiffusion.Protocol.Token.Headers(token), DateTime.UtcNow.AddSeconds(5)).Step;
        }
        catch (Grpc.Core.RpcException)
        {
            return 0;
        }
    }

    public static int FreePort()
    {
        using var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        return ((IPEndPoint)l.LocalEndpoint).Port;
    }

    /// <summary>The one-process reference: `coordinator train`'s trainer for <paramref name="steps"/> steps; its final checkpoint.</summary>
    public static CheckpointData LocalReference(Recipe recipe, string dir)
    {
        var (train, heldOut) = DatasetLoader.Load(recipe.ToDataOptions());
        using (train)
        using (heldOut)
        {
            using var state = TrainingState.Create(recipe, train.SampleShape, train.Count, CPU);
            using (var trainer = new LocalTrainer(state, train, dir)) trainer.Run(recipe.Steps);
            return CheckpointStore.Load(CheckpointStore.ResolveCheckpointFolder(dir));
        }
    }

    /// <summary>
    /// Asserts two checkpoints describe the same run state bit for bit: step, epoch and cursor; every weight, EMA weight
    /// and Adam moment byte for byte (the micro-batch tree makes the sum the same for every split of the batch).
    /// </summary>
    public static void AssertSameState(CheckpointData expected, CheckpointData actual, string diagnostics = "")
    {
        Assert.Equal(expected.Step, actual.Step);
        Assert.Equal(expected.Epoch, actual.Epoch);
        Assert.Equal(expected.Cursor, actual.Cursor);
        foreach (var (group, e, a) in new[] { ("model", expected.Model, actual.Model), ("ema", expected.Ema, actual.Ema), ("optimizer", expected.Optimizer, actual.Optimizer) })
        {
            Assert.Equal(e.Keys.Order(), a.Keys.Order());
            foreach (var (name, t) in e)
            {
                var other = a[name];
                if (t.bytes.SequenceEqual(other.bytes)) continue;
                var diff = (t - other).abs().max().item<float>();
                Assert.Fail($"{group} '{name}' differs (largest difference {diff}) at step {actual.Step}\n{diagnostics}");
            }
        }
    }

    /// <summary>`cmp` of the model, EMA and optimizer files of two runs' latest checkpoints.</summary>
    public static void AssertIdenticalFiles(string expectedRun, string actualRun)
    {
        var (e, a) = (CheckpointStore.ResolveCheckpointFolder(expectedRun), CheckpointStore.ResolveCheckpointFolder(actualRun));
        Assert.Equal(Path.GetFileName(e), Path.GetFileName(a));   // the same step
        foreach (var file in new[] { CheckpointStore.ModelFileName, CheckpointStore.EmaFileName, CheckpointStore.OptimizerFileName })
            Assert.True(File.ReadAllBytes(Path.Combine(e, file)).AsSpan().SequenceEqual(File.ReadAllBytes(Path.Combine(a, file))), $"{file} of {a} differs from {e}");
    }

    public static CheckpointData Latest(string runDir) => CheckpointStore.Load(CheckpointStore.ResolveCheckpointFolder(runDir));
}
