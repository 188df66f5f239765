using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using DistDiffusion.Coordinator.Access;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Hosting;
using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Protocol;

namespace DistDiffusion.Bench;

/// <summary>
/// `bench straggler`: steps/s of two healthy workers alone, then of the same two plus a third that is
/// slowed tenfold (stopped and continued by SIGSTOP/SIGCONT on a duty cycle). With slow slices copied to idle workers
/// and a straggler sitting steps out until it answers, the three must reach at least 0.8x the healthy pair. The two
/// configurations alternate (--rounds, 3 by default) and the ratio is of the medians: one run of each landed anywhere
/// from 0.68x to 0.94x within an hour on this VM, whose speed drifts from minute to minute.
/// </summary>
internal static partial class StragglerCommand
{
    public const double Goal = 0.8;
    private const int SigStop = 19, SigCont = 18;   // Linux x86-64 / arm64

    public static Command Create()
    {
        var recipe = new Option<string>("--recipe") { Description = "Recipe to train", DefaultValueFactory = _ => "swissroll" };
        var steps = new Option<int>("--steps") { Description = "Steps timed in each configuration (after the warm-up)", DefaultValueFactory = _ => 400 };
        var warmup = new Option<int>("--warmup") { Description = "Untimed steps first", DefaultValueFactory = _ => 40 };
        var slowdown = new Option<double>("--slowdown") { Description = "The straggler runs 1/slowdown of the time", DefaultValueFactory = _ => 10 };
        var period = new Option<int>("--period-ms") { Description = "Duty-cycle period of the straggler (run, then stop)", DefaultValueFactory = _ => 100 };
        var set = new Option<string[]>("--set") { Description = "Override a recipe field, key=value (repeatable)" };
        var rounds = new Option<int>("--rounds") { Description = "Alternating rounds of the two configurations; the ratio is of the medians", DefaultValueFactory = _ => 3 };
        var cmd = new Command("straggler", "Steps/s of 2 healthy workers vs the same 2 plus one slowed tenfold") { recipe, steps, warmup, slowdown, period, set, rounds };
        cmd.SetAction(p =>
        {
            var n = p.GetValue(steps);
            var w = p.GetValue(warmup);
            var slow = p.GetValue(slowdown);
            var ms = p.GetValue(period);
            if (n < 10) throw new UsageException($"--steps {n}: expected at least 10");
            if (w < 1) throw new UsageException($"--warmup {w}: expected at least 1");
            if (!(slow >= 1)) throw new UsageException($"--slowdown {slow}: expected >= 1");
            if (ms < 10) throw new UsageException($"--period-ms {ms}: expected at least 10");
            var r = p.GetValue(rounds);
            if (r < 1) throw new UsageException($"--rounds {r}: expected at least 1");
            if (!OperatingSystem.IsLinux()) throw new UsageException("bench straggler stops processes with signals: Linux only");
            var sets = p.GetValue(set) ?? [];
            var pairs = new List<Measurement>();
            var withStraggler = new List<Measurement>();
            for (var k = 0; k < r; k++)
            {
                pairs.Add(Measure(p.GetValue(recipe)!, sets, 2, null, n, w));
                withStraggler.Add(Measure(p.GetValue(recipe)!, sets, 3, (slow, ms), n, w));
            }
            var (pairRate, withRate) = (CliSupport.Median(pairs.Select(m => m.Rate)), CliSupport.Median(withStraggler.Select(m => m.Rate)));
            var ratio = withRate / pairRate;
            var inv = CultureInfo.InvariantCulture;
            string Rates(List<Measurement> ms) => string.Join(", ", ms.Select(m => m.Rate.ToString("F1", inv)));
            Console.WriteLine(string.Create(inv, $"straggler: {p.GetValue(recipe)}, {n} timed steps, straggler runs 1/{slow:G3} of every {ms} ms, {r} alternating rounds"));
            Console.WriteLine(string.Create(inv, $"2 healthy workers            {pairRate,8:F1} steps/s (median of {Rates(pairs)})  backups {pairs.Sum(m => m.Backups)}"));
            Console.WriteLine(string.Create(inv, $"2 healthy + 1 slowed {slow,4:G3}x    {withRate,8:F1} steps/s (median of {Rates(withStraggler)})  backups {withStraggler.Sum(m => m.Backups)}, straggler took part in {withStraggler.Sum(m => (long)m.StragglerSteps)} of {r * (n + w)} steps"));
            Console.WriteLine(string.Create(inv, $"ratio {ratio:F3} (goal: at least {Goal:F1}): {(ratio >= Goal ? "met" : "NOT met")}; each round's: {string.Join(", ", pairs.Zip(withStraggler, (a, b) => (b.Rate / a.Rate).ToString("F2", inv)))}"));
            return CliSupport.ExitOk;
        });
        return cmd;
    }

    private sealed record Measurement(double Rate, long Backups, ulong StragglerSteps);


    private static Measurement Measure(string recipe, string[] sets, int workers, (double Slowdown, int PeriodMs)? straggler, int steps, int warmup)
    {
        var dir = Path.Combine(Path.GetTempPath(), "dd-straggler-" + Guid.NewGuid().ToString("N"));
        var options = new CoordinatorOptions
        {
            Listen = "http://127.0.0.1:0",
            Out = dir,
            Recipe = recipe,
            Set = ["checkpoint-every=0", "sample-every=0", .. sets],
            Steps = warmup + steps,
            MinWorkers = workers,
            Threads = 1,
        };
        Model.TorchRuntime.PreferPassiveThreads();
        var credentials = new ServerCredentials(null, Worker: Token.Generate(), Client: Token.Generate());
        var processes = new List<Process>();
        using var stop = new CancellationTokenSource();
        Thread? cycler = null;
        try
        {
#pragma warning disable CA2000 // disposed in the finally below (DisposeAsync, which the analyzer does not follow through GetResult)
            var server = CoordinatorServer.StartAsync(options, credentials, Serilog.Events.LogEventLevel.Warning, "[coordinator] ").GetAwaiter().GetResult();
#pragma warning restore CA2000
            try
            {
                for (var i = 0; i < workers; i++)
                    processes.Add(RunCommand.StartWorker(server.Address, credentials.Worker!, 1, "warning", $"[worker {i + 1}] ", Console.Error.WriteLine));
                while (server.Loop.StepsDone < warmup && !server.Loop.Completion.IsCompleted) Thread.Sleep(5);
                var clock = Stopwatch.StartNew();
                var fromStep = server.Loop.StepsDone;
                if (straggler is { } s)
                {
                    var pid = processes[^1].Id;
                    var run = TimeSpan.FromMilliseconds(s.PeriodMs / s.Slowdown);
                    var pause = TimeSpan.FromMilliseconds(s.PeriodMs) - run;
                    cycler = new Thread(() =>
                    {
                        while (!stop.IsCancellationRequested)
                        {
                            Thread.Sleep(run);
                            _ = Kill(pid, SigStop);
                            Thread.Sleep(pause);
                            _ = Kill(pid, SigCont);
                        }
                        _ = Kill(pid, SigCont);
                    }) { IsBackground = true, Name = "straggler duty cycle" };
                    cycler.Start();
                }
                server.Loop.Completion.WaitAsync(TimeSpan.FromMinutes(30)).GetAwaiter().GetResult();
                var rate = (server.Loop.StepsDone - fromStep) / clock.Elapsed.TotalSeconds;
                var stragglerSteps = straggler is null ? 0 : server.Loop.Status().Workers.Min(x => x.StepsDone);
                return new Measurement(rate, server.Loop.BackupsIssued, stragglerSteps);
            }
            finally
            {
                stop.Cancel();
                cycler?.Join();
                server.DisposeAsync().AsTask().GetAwaiter().GetResult();
            }
        }
        finally
        {
            foreach (var p in processes)
            {
                _ = Kill(p.Id, SigCont);
                if (!p.WaitForExit(TimeSpan.FromSeconds(10))) p.Kill(entireProcessTree: true);
                p.Dispose();
            }
            if (Directory.Exists(dir)) Directory.Delete(dir, true);
        }
    }

    [LibraryImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static partial int Kill(int pid, int signal);
}
