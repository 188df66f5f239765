using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;

namespace DistDiffusion.Tests.Distributed;

/// <summary>
/// `coordinator run` as a script or supervisor drives it: however the run process ends, its worker processes end with
/// it, and `kill -INT` stops it like Ctrl+C does. Linux: the tests read /proc to see which processes are left.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed partial class OrphanAndSignalTests() : TempFolderTest("dd-orphans")
{
    private static string[] RunArgs(string runDir) =>
    [
        "run", "--workers", "2", "--worker-threads", "1", "--recipe", "swissroll", "--seed", "11", "--steps", "100000", "--out", runDir,
        "--log-level", "information", .. Cluster.Sets().SelectMany(s => new[] { "--set", s }),
    ];

    [Fact(Timeout = 120_000)]
    public async Task KillingTheRunProcessTakesItsWorkersWithIt()
    {
        var runDir = Path.Combine(Dir, "run");
        using var run = new CoordinatorProcess(RunArgs(runDir));
        var (workers, _, _) = await UnderWay(run, runDir);
        try
        {
            // Training: every thread of both workers runs as SCHED_BATCH (3), so none preempts the coordinator when it wakes.
            foreach (var w in workers)
            {
                var policies = Directory.GetDirectories($"/proc/{w.Pid}/task").Select(t => DistDiffusion.Worker.CpuScheduling.PolicyOf(w.Pid, int.Parse(Path.GetFileName(t), System.Globalization.CultureInfo.InvariantCulture))).Where(p => p is not null).ToList();
                Assert.NotEmpty(policies);
                Assert.All(policies, p => Assert.Equal(3, p));
            }
            // ... and, where two one-thread workers fill the CPUs this process may use (2 cores), on a CPU of its own: every thread.
            var blocks = DistDiffusion.Worker.CpuAffinity.Blocks(DistDiffusion.Worker.CpuAffinity.Allowed(), 2, 1);
            var pinned = workers.Select(w => Directory.GetDirectories($"/proc/{w.Pid}/task")
                .Select(t => DistDiffusion.Worker.CpuAffinity.Of(w.Pid, int.Parse(Path.GetFileName(t), System.Globalization.CultureInfo.InvariantCulture)))
                .Where(c => c is not null).Select(c => DistDiffusion.Worker.CpuAffinity.Format(c!)).Distinct().ToList()).ToList();
            if (blocks is null)
                Assert.All(pinned, p => Assert.Equal([DistDiffusion.Worker.CpuAffinity.Format(DistDiffusion.Worker.CpuAffinity.Allowed())], p));
            else
                Assert.Equal(blocks.Select(b => DistDiffusion.Worker.CpuAffinity.Format(b)).Order(), pinned.Select(p => Assert.Single(p)).Order());
            // SIGKILL to the run process alone: its finally block, which kills the workers, never runs.
            run.Process.Kill(entireProcessTree: false);
            await run.Process.WaitForExitAsync();
            await Cluster.WaitUntil(() => !workers.Any(ProcessTable.Running), TimeSpan.FromSeconds(10),
                "both workers to exit after the run process was killed", () => Describe(workers) + run.Output);
        }
        finally
        {
            KillLeftovers(workers);
        }
    }

    [Fact(Timeout = 120_000)]
    public async Task SigintFromAScriptStopsTheRunWithACheckpointAndLeavesNoWorkers()
    {
        var runDir = Path.Combine(Dir, "run");
        // Started the way `coordinator run ... &` in a script starts it: with SIGINT ignored.
        using var run = new CoordinatorProcess(RunArgs(runDir), ignoringInterrupt: true);
        var (workers, address, token) = await UnderWay(run, runDir);
        try
        {
            var before = Cluster.Step(address, token);
            await ProcessTable.Signal(run.Process.Id, "INT");
            await Cluster.WaitUntil(() => run.Process.HasExited, TimeSpan.FromSeconds(15), "the run to exit after kill -INT", () => run.Output);
            run.Process.WaitForExit();   // and its output to be read to the end
            Assert.True(run.Process.ExitCode == 130, $"exit code {run.Process.ExitCode}\n{run.Output}");
            var stopped = StoppedAt().Match(run.Output);
            Assert.True(stopped.Success, "no 'stopped at step N' line\n" + run.Output);
            var step = ulong.Parse(stopped.Groups[1].Value, CultureInfo.InvariantCulture);
            Assert.True(step >= before, $"stopped at step {step}, but the run was at step {before} before the signal");
            var checkpoint = Path.Combine(runDir, "checkpoints", step.ToString(CultureInfo.InvariantCulture), "checkpoint.json");
            Assert.True(File.Exists(checkpoint), $"no checkpoint of the last step: {checkpoint}\n{run.Output}");
            // The run kills what is left of its workers before it exits; give the kernel a moment to deliver that.
            await Cluster.WaitUntil(() => !workers.Any(ProcessTable.Running), TimeSpan.FromSeconds(5),
                "no worker to remain after the run exited", () => Describe(workers) + run.Output);
        }
        finally
        {
            KillLeftovers(workers);
        }
    }

    [Fact(Timeout = 120_000)]
    public async Task SigtermStopsTrainWithACheckpointAndExitCode143()
    {
        var runDir = Path.Combine(Dir, "train");
        using var train = new CoordinatorProcess(["train", "--recipe", "swissroll", "--seed", "11", "--steps", "100000", "--out", runDir, "--threads", "1",
            .. Cluster.Sets().SelectMany(s => new[] { "--set", s })]);
        await Cluster.WaitUntil(() => train.Process.HasExited || train.Output.Contains("training swissroll", StringComparison.Ordinal), TimeSpan.FromSeconds(60),
            "training to start", () => train.Output);
        Assert.False(train.Process.HasExited, train.Output);
        await Task.Delay(TimeSpan.FromSeconds(1));   // some steps
        await ProcessTable.Signal(train.Process.Id, "TERM");
        await train.Process.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(30));
        train.Process.WaitForExit();
        // 128 + 15, as `run` and `serve` exit after SIGTERM and as a worker does.
        Assert.True(train.Process.ExitCode == 143, $"exit code {train.Process.ExitCode}\n{train.Output}");
        var stopped = StoppedAt().Match(train.Output);
        Assert.True(stopped.Success, "no 'stopped at step N' line\n" + train.Output);
        Assert.True(File.Exists(Path.Combine(runDir, "checkpoints", stopped.Groups[1].Value, "checkpoint.json")), train.Output);
    }

    [Theory(Timeout = 60_000)]
    [InlineData("INT", 130)]
    [InlineData("TERM", 143)]
    public async Task AWorkerStoppedByASignalExitsWith128PlusItsNumber(string signal, int expected)
    {
        // Nothing listens there: the worker keeps retrying until the signal.
        using var worker = new WorkerProcess(new Uri($"http://127.0.0.1:{Cluster.FreePort()}"), Cluster.Token, 1);
        await Cluster.WaitUntil(() => worker.Process.HasExited || worker.Output.Contains("Retrying in", StringComparison.Ordinal), TimeSpan.FromSeconds(40),
            "the worker's first retry", () => worker.Output);
        Assert.False(worker.Process.HasExited, worker.Output);
        await ProcessTable.Signal(worker.Process.Id, signal);
        await worker.Process.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(30));
        Assert.True(worker.Process.ExitCode == expected, $"exit code {worker.Process.ExitCode} after SIG{signal}\n{worker.Output}");
    }

    [Fact]
    public void SignalsMapToTheSameExitCodesInTheCoordinatorAndTheWorker()
    {
        Assert.Equal(130, DistDiffusion.Worker.WorkerCli.SignalExitCode(System.Runtime.InteropServices.PosixSignal.SIGINT));
        Assert.Equal(131, DistDiffusion.Worker.WorkerCli.SignalExitCode(System.Runtime.InteropServices.PosixSignal.SIGQUIT));
        Assert.Equal(143, DistDiffusion.Worker.WorkerCli.SignalExitCode(System.Runtime.InteropServices.PosixSignal.SIGTERM));
        using var cts = new CancellationTokenSource();
        using var registration = DistDiffusion.Coordinator.Cli.StopSignals.Register(cts);
        Assert.Null(registration.Received);
        Assert.Equal(130, registration.ExitCode);   // cancelled otherwise than by a signal
    }

    [Fact(Timeout = 60_000)]
    public async Task AWorkerWhoseParentIsAlreadyGoneDoesNotStart()
    {
        // The parent may die before the worker gets to look: process 1 is never the parent of a worker the tests start.
        using var worker = new WorkerProcess(new Uri($"http://127.0.0.1:{Cluster.FreePort()}"), Cluster.Token, 1, "--exit-with-parent", "1");
        await worker.Process.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(30));
        Assert.True(worker.Process.ExitCode == 1, $"exit code {worker.Process.ExitCode}\n{worker.Output}");
        Assert.Contains("--exit-with-parent 1: that process is gone", worker.Output, StringComparison.Ordinal);
    }

    /// <summary>Waits until the run has started its two worker processes and trained a few steps with them.</summary>
    private static async Task<(List<ProcessTable.Entry> Workers, Uri Address, string Token)> UnderWay(CoordinatorProcess run, string runDir)
    {
        List<ProcessTable.Entry> workers = [];
        await Cluster.WaitUntil(() => run.Process.HasExited || (workers = ProcessTable.Children(run.Process.Id)).Count == 2, TimeSpan.FromSeconds(60),
            "two worker processes", () => run.Output);
        Assert.False(run.Process.HasExited, "the run exited early\n" + run.Output);
        // The first line `run` prints names the coordinator's address; the token is in RUN/token.
        Uri? address = null;
        await Cluster.WaitUntil(() => (address = AddressIn(run.Output)) is not null, TimeSpan.FromSeconds(10), "the coordinator's address", () => run.Output);
        var token = DistDiffusion.Protocol.Token.Resolve(Path.Combine(runDir, "token"))!;
        await Cluster.WaitUntil(() => Cluster.Step(address!, token) >= 5, TimeSpan.FromSeconds(90), "step 5", () => run.Output);
        return (workers, address!, token);
    }

    private static Uri? AddressIn(string output) => CoordinatorAddress().Match(output) is { Success: true } m ? new Uri(m.Groups[1].Value) : null;

    private static string Describe(List<ProcessTable.Entry> workers) =>
        $"workers {string.Join(", ", workers.Select(w => $"{w.Pid} ({(ProcessTable.Running(w) ? "running" : "gone")})"))}\n";

    /// <summary>A failed test must not leave orphans behind for the next one.</summary>
    private static void KillLeftovers(List<ProcessTable.Entry> workers)
    {
        foreach (var w in workers.Where(ProcessTable.Running))
        {
            try
            {
                using var p = Process.GetProcessById(w.Pid);
                p.Kill();
            }
            catch (Exception e) when (e is ArgumentException or InvalidOperationException)
            {
                // already gone
            }
        }
    }

    [GeneratedRegex(@"coordinator (http://[^,\s]+),")]
    private static partial Regex CoordinatorAddress();

    [GeneratedRegex(@"stopped at step (\d+);")]
    private static partial Regex StoppedAt();
}
