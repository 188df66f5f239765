using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Protocol;

namespace DistDiffusion.Bench;

/// <summary>
/// `bench timeline`: a `coordinator run` whose processes record when each step passes each point of
/// its critical path (<see cref="StepTimeline"/>), then a table of where the time went: the last worker's compute, its
/// push, the coordinator's copy, check, sum and update, the parameters' way back. What the exchange and update cost
/// per step, measured across the real processes rather than inferred from rates.
/// </summary>
internal static class TimelineCommand
{
    public static Command Create()
    {
        var recipe = new Option<string>("--recipe") { Description = "Recipe to train", DefaultValueFactory = _ => "swissroll" };
        var workers = new Option<int>("--workers") { Description = "Worker processes", DefaultValueFactory = _ => 2 };
        var steps = new Option<long>("--steps") { Description = "Steps to train", DefaultValueFactory = _ => 2000 };
        var skip = new Option<long>("--skip") { Description = "Steps left out at the start (joining, warm-up)", DefaultValueFactory = _ => 100 };
        var set = new Option<string[]>("--set") { Description = "Override a recipe field, key=value (repeatable)" };
        var transport = new Option<string>("--worker-transport") { Description = "How the workers' Trainer streams travel: socket (default) or grpc", DefaultValueFactory = _ => "socket" };
        var cmd = new Command("timeline", "Train with `coordinator run` and show where each step's time goes, process by process") { recipe, workers, steps, skip, set, ServeCommand.SharedMemory, transport };
        cmd.SetAction(p =>
        {
            var w = p.GetValue(workers);
            var n = p.GetValue(steps);
            var k = p.GetValue(skip);
            if (w < 1) throw new UsageException($"--workers {w}: expected at least 1");
            if (k < 0 || k >= n - 1) throw new UsageException($"--skip {k}: expected 0..{n - 2} (below --steps {n} minus one)");
            var t = CliSupport.UserInput(() => TrainerTransports.Parse(p.GetValue(transport)!, "--worker-transport"));
            var dir = Path.Combine(Path.GetTempPath(), "dd-timeline-" + Guid.NewGuid().ToString("N"));
            try
            {
                var exit = Run(p.GetValue(recipe)!, w, n, Path.Combine(dir, "run"), Path.Combine(dir, "marks"), p.GetValue(set) ?? [], p.GetValue(ServeCommand.SharedMemory) ?? true, t, out var log);
                if (exit != 0)
                {
                    Console.Error.WriteLine($"error: the run exited with code {exit}; its output:\n{log}");
                    return CliSupport.ExitFailure;
                }
                Print(p.GetValue(recipe)!, StepTimelineAnalysis.Analyze(Path.Combine(dir, "marks"), k));
                return CliSupport.ExitOk;
            }
            finally
            {
                if (Directory.Exists(dir)) Directory.Delete(dir, true);
            }
        });
        return cmd;
    }

    /// <summary>`coordinator run` as a child process with the timeline switched on for it and its workers; returns its exit code.</summary>
    internal static int Run(string recipe, int workers, long steps, string runDir, string marksDir, IEnumerable<string> sets, bool sharedMemory, TrainerTransport transport, out string log)
    {
        var psi = RunCommand.StartInfo("coordinator", BenchRuns.RunArguments(recipe, workers, steps, runDir, sharedMemory, transport, "warning", sets));
        psi.Environment[StepTimeline.Variable] = marksDir;
        using var process = Process.Start(psi) ?? throw new InvalidOperationException("could not start coordinator run");
        var output = new System.Text.StringBuilder();
        process.OutputDataReceived += (_, e) => { lock (output) output.AppendLine(e.Data); };
        process.ErrorDataReceived += (_, e) => { lock (output) output.AppendLine(e.Data); };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        process.WaitForExit();
        lock (output) log = output.ToString();
        return process.ExitCode;
    }

    private static void Print(string recipe, TimelineReport r)
    {
        var inv = CultureInfo.InvariantCulture;
        Console.WriteLine(string.Create(inv, $"timeline: {recipe}, {r.Workers} workers, {r.Steps} steps analysed; step {r.StepMedianMs:F3} ms median, {r.StepMeanMs:F3} ms mean ({1000 / r.StepMeanMs:F1} steps/s)"));
        Console.WriteLine("phase (the last worker's path)   median ms    mean ms     p90 ms   share  where");
        foreach (var ph in r.Phases.Append(r.Sending).Append(r.Imbalance))
        {
            var share = ph == r.Imbalance || ph == r.Sending ? "" : string.Create(inv, $"{100 * ph.MeanMs / r.StepMeanMs,5:F1}%");
            Console.WriteLine(string.Create(inv, $"{ph.Name,-32} {ph.MedianMs,9:F3} {ph.MeanMs,10:F3} {ph.P90Ms,10:F3} {share,7}  {ph.Where}"));
        }
        var compute = r.Phases[0];
        Console.WriteLine(string.Create(inv, $"outside the last worker's compute: {r.StepMeanMs - compute.MeanMs:F3} ms mean per step ({100 * (r.StepMeanMs - compute.MeanMs) / r.StepMeanMs:F1}% of the step), {r.StepMedianMs - compute.MedianMs:F3} ms at the medians"));
    }
}
