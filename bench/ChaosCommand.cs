using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Training;
using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;
using Grpc.Core;

namespace DistDiffusion.Bench;

/// <summary>
/// `bench chaos`: the promise that training survives lost workers and a lost coordinator without losing
/// or doubling a sample or a bit. The same run twice, a `serve` process and worker processes on this machine: once
/// undisturbed, once with a random worker SIGKILLed and restarted every K steps and the coordinator SIGKILLed and
/// resumed from its checkpoints. Prints how many samples each epoch saw (from the coordinator's sample ledger), the
/// largest difference between the two runs' final parameters, and the wall time the faults cost.
/// </summary>
internal static class ChaosCommand
{
    public static Command Create()
    {
        var recipe = new Option<string>("--recipe") { Description = "Recipe to train", DefaultValueFactory = _ => "swissroll" };
        var steps = new Option<int>("--steps") { Description = "Steps of each run", DefaultValueFactory = _ => 2000 };
        var workers = new Option<int>("--workers") { Description = "Worker processes", DefaultValueFactory = _ => 3 };
        var killEvery = new Option<int>("--kill-every") { Description = "SIGKILL and restart a random worker every this many steps", DefaultValueFactory = _ => 100 };
        var coordinatorKills = new Option<int>("--coordinator-kills") { Description = "Times the coordinator is SIGKILLed and resumed (evenly spread)", DefaultValueFactory = _ => 2 };
        var checkpointEvery = new Option<int>("--checkpoint-every") { Description = "Checkpoint interval of both runs", DefaultValueFactory = _ => 100 };
        var seed = new Option<int>("--seed") { Description = "Seed of the run and of the choice of victims", DefaultValueFactory = _ => 1 };
        var output = new Option<string?>("--out") { Description = "Folder for both runs (default: a temporary folder, deleted afterwards)" };
        var set = new Option<string[]>("--set") { Description = "Override a recipe field, key=value (repeatable)" };
        var cmd = new Command("chaos", "An undisturbed run vs the same run with workers and the coordinator SIGKILLed: samples per epoch, parameter difference, time lost")
        {
            recipe, steps, workers, killEvery, coordinatorKills, checkpointEvery, seed, output, set,
        };
        cmd.SetAction(p =>
        {
            var settings = new Settings(p.GetValue(recipe)!, p.GetValue(steps), p.GetValue(workers), p.GetValue(killEvery), p.GetValue(coordinatorKills),
                p.GetValue(checkpointEvery), p.GetValue(seed), p.GetValue(set) ?? []);
            settings.Validate();
            var dir = p.GetValue(output) ?? Path.Combine(Path.GetTempPath(), "dd-chaos-" + Guid.NewGuid().ToString("N"));
            Directory.CreateDirectory(dir);
            try
            {
                var token = Token.Generate();
                var tokenFile = Path.Combine(dir, "token");
                Token.WriteFile(tokenFile, token);
                var calm = RunAsync(settings, Path.Combine(dir, "undisturbed"), token, tokenFile, chaos: false).GetAwaiter().GetResult();
                var chaos = RunAsync(settings, Path.Combine(dir, "chaos"), token, tokenFile, chaos: true).GetAwaiter().GetResult();
                return Report(settings, calm, chaos);
            }
            finally
            {
                if (p.GetValue(output) is null && Directory.Exists(dir)) Directory.Delete(dir, true);
            }
        });
        return cmd;
    }

    private sealed record Settings(string Recipe, int Steps, int Workers, int KillEvery, int CoordinatorKills, int CheckpointEvery, int Seed, string[] Sets)
    {
        public void Validate()
        {
            if (Steps < 10) throw new UsageException($"--steps {Steps}: expected at least 10");
            if (Workers < 2) throw new UsageException($"--workers {Workers}: expected at least 2 (one is always being restarted)");
            if (KillEvery < 1) throw new UsageException($"--kill-every {KillEvery}: expected at least 1");
            if (CoordinatorKills < 0) throw new UsageException($"--coordinator-kills {CoordinatorKills}: expected 0 or more");
            if (CheckpointEvery < 1) throw new UsageException($"--checkpoint-every {CheckpointEvery}: expected at least 1 (the coordinator resumes from checkpoints)");
        }
    }

    private sealed record RunResult(string Folder, TimeSpan Wall, int WorkerKills, int CoordinatorKills, string Log);

    private static async Task<RunResult> RunAsync(Settings s, string folder, string token, string tokenFile, bool chaos)
    {
        var inv = CultureInfo.InvariantCulture;
        var address = new Uri($"http://127.0.0.1:{FreePort()}");
        string[] common = ["serve", "--listen", address.ToString(), "--token-file", tokenFile, "--steps", s.Steps.ToString(inv), "--min-workers", s.Workers.ToString(inv),
            "--heartbeat", "1", "--log-level", "warning", "--sample-ledger", Path.Combine(folder + ".ledger.jsonl")];
        string[] fresh = [.. common, "--recipe", s.Recipe, "--out", folder, "--seed", s.Seed.ToString(inv),
            "--set", $"checkpoint-every={s.CheckpointEvery}", "--set", "sample-every=0", .. s.Sets.SelectMany(x => new[] { "--set", x })];
        string[] resume = [.. common, "--resume", folder];
        var log = new System.Text.StringBuilder();
        void Line(string text) { lock (log) log.AppendLine(text); }
        var random = new Random(s.Seed);
        var workers = new List<Process>();
        Process? coordinator = null;
        var (workerKills, coordinatorKills) = (0, 0);
        var coordinatorKillSteps = Enumerable.Range(1, s.CoordinatorKills).Select(j => (ulong)(s.Steps * j / (s.CoordinatorKills + 1))).ToList();
        var clock = Stopwatch.StartNew();
        try
        {
            coordinator = StartCoordinator(fresh, "[coordinator] ", Line);
            for (var i = 0; i < s.Workers; i++) workers.Add(StartWorker(address, token, i, Line));
            using var channel = ClientChannel.Create(address);
            var client = new Coordination.CoordinationClient(channel);
            var nextWorkerKill = (ulong)s.KillEvery;
            while (true)
            {
                if (coordinator.HasExited)
                {
                    if (coordinator.ExitCode != 0) throw new InvalidOperationException($"the coordinator exited with code {coordinator.ExitCode}:\n{log}");
                    break;
                }
                var step = await StepAsync(client, token);
                if (chaos && step is { } at)
                {
                    if (at >= nextWorkerKill && at < (ulong)s.Steps)
                    {
                        var k = random.Next(workers.Count);
                        workers[k].Kill();
                        await workers[k].WaitForExitAsync();
                        workers[k].Dispose();
                        workers[k] = StartWorker(address, token, k, Line);
                        workerKills++;
                        nextWorkerKill += (ulong)s.KillEvery;
                    }
                    if (coordinatorKillSteps.Count > 0 && at >= coordinatorKillSteps[0] && at < (ulong)s.Steps)
                    {
                        coordinatorKillSteps.RemoveAt(0);
                        coordinator.Kill();
                        await coordinator.WaitForExitAsync();
                        coordinator.Dispose();
                        coordinatorKills++;
                        Line($"-- coordinator SIGKILLed at step {at}; resuming from its checkpoints");
                        coordinator = StartCoordinator(resume, "[coordinator] ", Line);
                    }
                }
                await Task.Delay(20);
            }
            var wall = clock.Elapsed;
            foreach (var w in workers)
                if (!w.WaitForExit(TimeSpan.FromSeconds(15))) w.Kill(entireProcessTree: true);
            return new RunResult(folder, wall, workerKills, coordinatorKills, log.ToString());
        }
        finally
        {
            foreach (var w in workers)
            {
                if (!w.HasExited) w.Kill(entireProcessTree: true);
                w.Dispose();
            }
            if (coordinator is { HasExited: false }) coordinator.Kill(entireProcessTree: true);
            coordinator?.Dispose();
        }
    }

    private static Process StartCoordinator(string[] args, string prefix, Action<string> output) =>
        RunCommand.StartForwarding(RunCommand.StartInfo("coordinator", args), prefix, output);

    // Workers outlive coordinator restarts: they retry for up to 5 minutes.
    private static Process StartWorker(Uri address, string token, int index, Action<string> output) =>
        RunCommand.StartWorker(address, token, 1, "warning", $"[worker {index + 1}] ", output, giveUpAfterSeconds: 300);

    private static async Task<ulong?> StepAsync(Coordination.CoordinationClient client, string token)
    {
        try
        {
            var reply = await client.GetStatusAsync(new GetStatusRequest(), Token.Headers(token), DateTime.UtcNow.AddSeconds(2));
            return reply.Step;
        }
        catch (RpcException)
        {
            return null;   // restarting
        }
    }

    private static int FreePort()
    {
        using var l = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0);
        l.Start();
        return ((System.Net.IPEndPoint)l.LocalEndpoint).Port;
    }

    private static int Report(Settings s, RunResult calm, RunResult chaos)
    {
        var inv = CultureInfo.InvariantCulture;
        var (expected, actual) = (CheckpointStore.ResolveCheckpointFolder(calm.Folder), CheckpointStore.ResolveCheckpointFolder(chaos.Folder));
        var identical = new[] { CheckpointStore.ModelFileName, CheckpointStore.EmaFileName, CheckpointStore.OptimizerFileName }
            .All(f => File.ReadAllBytes(Path.Combine(expected, f)).AsSpan().SequenceEqual(File.ReadAllBytes(Path.Combine(actual, f))));
        var a = CheckpointStore.Load(expected);
        var b = CheckpointStore.Load(actual);
        double largest;
        long trainSize;
        try
        {
            largest = new[] { (a.Model, b.Model), (a.Ema, b.Ema), (a.Optimizer, b.Optimizer) }
                .SelectMany(g => g.Item1.Select(kv => (double)(kv.Value - g.Item2[kv.Key]).abs().max().item<float>()))
                .DefaultIfEmpty(0).Max();
            trainSize = long.Parse(b.Extra[TrainingState.TrainSizeKey], inv);
        }
        finally
        {
            a.DisposeTensors();
            b.DisposeTensors();
        }
        Console.WriteLine(string.Create(inv, $"chaos: {s.Recipe}, {s.Steps} steps, {s.Workers} workers, checkpoint every {s.CheckpointEvery}"));
        Console.WriteLine(string.Create(inv, $"undisturbed run     {calm.Wall.TotalSeconds,8:F1} s"));
        Console.WriteLine(string.Create(inv, $"with faults         {chaos.Wall.TotalSeconds,8:F1} s  ({chaos.WorkerKills} workers SIGKILLed and restarted, coordinator SIGKILLed and resumed {chaos.CoordinatorKills} times)"));
        Console.WriteLine(string.Create(inv, $"time lost to faults {(chaos.Wall - calm.Wall).TotalSeconds,8:F1} s"));
        Console.WriteLine(string.Create(inv, $"final step {Path.GetFileName(actual)} vs {Path.GetFileName(expected)}; largest parameter difference (model, EMA, Adam) {largest:G3}; files byte-identical: {(identical ? "yes" : "NO")}"));
        var ok = identical && Path.GetFileName(actual) == Path.GetFileName(expected);
        foreach (var (label, run) in new[] { ("undisturbed", calm), ("with faults", chaos) })
        {
            var epochs = Epochs(run.Folder + ".ledger.jsonl", s.Steps, trainSize, out var problem);
            if (problem is not null)
            {
                Console.WriteLine($"samples ({label}): {problem}");
                ok = false;
                continue;
            }
            var bad = epochs.Where(e => e.Doubled > 0 || (e.Complete && (e.Distinct != trainSize || e.Seen != trainSize))).ToList();
            foreach (var e in bad)
                Console.WriteLine(string.Create(inv, $"samples ({label}) epoch {e.Epoch}: {e.Seen} seen, {e.Distinct} distinct of {trainSize}, {e.Doubled} doubled"));
            var complete = epochs.Where(e => e.Complete).ToList();
            var open = epochs.FirstOrDefault(e => !e.Complete);
            var verdict = bad.Count == 0 ? string.Create(inv, $"each saw every one of the {trainSize} samples exactly once") : string.Create(inv, $"{bad.Count} of them wrong");
            var progress = open is null ? "" : string.Create(inv, $"; epoch {open.Epoch} in progress: {open.Seen} samples, {open.Doubled} twice");
            Console.WriteLine(string.Create(inv, $"samples ({label}): {complete.Count} complete epochs, {verdict}{progress}"));
            if (bad.Count > 0) ok = false;
        }
        Console.WriteLine(ok ? "every epoch saw each sample exactly once and the final state is bit for bit the undisturbed one" : "NOT met: see above");
        if (!ok) Console.Error.WriteLine(chaos.Log);
        return ok ? CliSupport.ExitOk : CliSupport.ExitFailure;
    }

    private sealed record EpochCount(long Epoch, long Seen, long Distinct, long Doubled, bool Complete);

    /// <summary>
    /// The samples each epoch saw, from a sample ledger: one line per applied step; a step applied again after the
    /// coordinator was killed and resumed replaces its earlier line (the state rolled back to the checkpoint).
    /// </summary>
    private static List<EpochCount> Epochs(string ledger, int steps, long trainSize, out string? problem)
    {
        var byStep = new Dictionary<long, (long[] Indices, long[] Epochs)>();
        foreach (var line in File.ReadLines(ledger))
        {
            using var doc = JsonDocument.Parse(line);
            var root = doc.RootElement;
            byStep[root.GetProperty("step").GetInt64()] = (root.GetProperty("indices").EnumerateArray().Select(x => x.GetInt64()).ToArray(),
                root.GetProperty("epochs").EnumerateArray().Select(x => x.GetInt64()).ToArray());
        }
        var missing = Enumerable.Range(0, steps).Where(k => !byStep.ContainsKey(k)).ToList();
        if (missing.Count > 0)
        {
            problem = $"{missing.Count} steps missing from the ledger (first {missing[0]})";
            return [];
        }
        problem = null;
        var counts = new SortedDictionary<long, Dictionary<long, int>>();
        foreach (var (indices, epochs) in byStep.Values)
            for (var i = 0; i < indices.Length; i++)
            {
                if (!counts.TryGetValue(epochs[i], out var c)) counts[epochs[i]] = c = [];
                c[indices[i]] = c.GetValueOrDefault(indices[i]) + 1;
            }
        var last = counts.Keys.Max();
        return counts.Select(kv => new EpochCount(kv.Key, kv.Value.Values.Sum(), kv.Value.Count, kv.Value.Values.Count(n => n > 1), kv.Key < last || kv.Value.Count == trainSize)).ToList();
    }
}
