using System.CommandLine;
using System.Globalization;
using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Protocol;

namespace DistDiffusion.Bench;

/// <summary>
/// `bench soak`: a long `coordinator run` whose every process's resident memory is sampled against the
/// step; prints each process's RSS at the reference step, at the end and at its peak, and the growth per step.
/// The distributed path must stay flat: the goal is an end RSS within 64 MB of the reference step's for every process.
/// </summary>
internal static class SoakCommand
{
    public const long GoalBytes = 64L << 20;

    public static Command Create()
    {
        var recipe = new Option<string>("--recipe") { Description = "Recipe to train", DefaultValueFactory = _ => "swissroll" };
        var workers = new Option<int>("--workers") { Description = "Worker processes", DefaultValueFactory = _ => 2 };
        var steps = new Option<long>("--steps") { Description = "Steps to train", DefaultValueFactory = _ => 3000 };
        var reference = new Option<long>("--reference-step") { Description = "Step whose RSS the end is compared with", DefaultValueFactory = _ => 300 };
        var output = new Option<string?>("--out") { Description = "Run folder (default: a temporary folder, deleted afterwards)" };
        var set = new Option<string[]>("--set") { Description = "Override a recipe field, key=value (repeatable)" };
        var transport = new Option<string>("--worker-transport") { Description = "How the workers' Trainer streams travel: socket (default) or grpc", DefaultValueFactory = _ => "socket" };
        var cmd = new Command("soak", "Train with `coordinator run` and watch every process's memory against the step") { recipe, workers, steps, reference, output, set, ServeCommand.SharedMemory, transport };
        cmd.SetAction(p =>
        {
            var w = p.GetValue(workers);
            var n = p.GetValue(steps);
            var r = p.GetValue(reference);
            if (w < 1) throw new UsageException($"--workers {w}: expected at least 1");
            var t = CliSupport.UserInput(() => TrainerTransports.Parse(p.GetValue(transport)!, "--worker-transport"));
            if (r < 1 || r >= n) throw new UsageException($"--reference-step {r}: expected 1..{n - 1} (below --steps {n})");
            if (!OperatingSystem.IsLinux()) throw new UsageException("bench soak reads /proc: it runs on Linux only");
            var dir = p.GetValue(output) ?? Path.Combine(Path.GetTempPath(), "dd-soak-" + Guid.NewGuid().ToString("N"));
            try
            {
                var result = SoakMonitor.RunAsync(p.GetValue(recipe)!, w, n, r, dir, p.GetValue(set) ?? [], CancellationToken.None, p.GetValue(ServeCommand.SharedMemory) ?? true, t).GetAwaiter().GetResult();
                return Report(result);
            }
            finally
            {
                if (p.GetValue(output) is null && Directory.Exists(dir)) Directory.Delete(dir, true);
            }
        });
        return cmd;
    }

    private static int Report(SoakResult r)
    {
        var inv = CultureInfo.InvariantCulture;
        static string Mb(long bytes) => (bytes / 1048576.0).ToString("F0", CultureInfo.InvariantCulture);
        if (r.ExitCode != 0 || r.Processes.Count == 0)
        {
            Console.Error.WriteLine($"error: the run exited with code {r.ExitCode} at step {r.EndStep}; its output:\n{r.Log}");
            return CliSupport.ExitFailure;
        }
        Console.WriteLine(string.Create(inv, $"soak: {r.Recipe}, {r.Workers} workers, steps {r.ReferenceStep} -> {r.EndStep}, {r.StepsPerSecond:F1} steps/s"));
        Console.WriteLine("process        RSS@ref MB  RSS@end MB  peak MB  growth MB  KB/step");
        foreach (var p in r.Processes)
            Console.WriteLine(string.Create(inv, $"{p.Role,-13} {Mb(p.AtReference),11} {Mb(p.AtEnd),11} {Mb(p.Peak),8} {(p.Growth / 1048576.0),10:F1} {p.Growth / 1024.0 / (r.EndStep - r.ReferenceStep),8:F1}"));
        var worst = r.Processes.MaxBy(p => p.Growth)!;
        Console.WriteLine(string.Create(inv, $"largest growth: {worst.Role} {worst.Growth / 1048576.0:F1} MB over {r.EndStep - r.ReferenceStep} steps (goal: within {GoalBytes >> 20} MB): {(r.Processes.All(p => p.Growth <= GoalBytes) ? "met" : "NOT met")}"));
        return CliSupport.ExitOk;
    }
}
