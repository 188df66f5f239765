using System.CommandLine;
using System.Globalization;
using DistDiffusion.Coordinator.Observe;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Training;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>`coordinator train`: one-process training, the reference path the distributed trainer must match.</summary>
internal static class TrainCommand
{
    public static Command Create()
    {
        var recipe = new Option<string?>("--recipe") { Description = CliSupport.RecipeDescription };
        var set = new Option<string[]>("--set") { Description = "Override a recipe field, key=value (repeatable), e.g. --set learning-rate=2e-4", AllowMultipleArgumentsPerToken = false };
        var steps = new Option<int?>("--steps") { Description = "Train until this many steps are done (default: the recipe's)" };
        var seed = new Option<long?>("--seed") { Description = "Run seed: initial weights, data order, per-sample noise, synthetic data and the train/held-out split" };
        var output = new Option<string?>("--out") { Description = "Run folder for checkpoints, samples and recipe.json" };
        var resume = new Option<string?>("--resume") { Description = "Continue a run: a run folder (its latest checkpoint) or one checkpoint folder" };
        var device = CliSupport.DeviceOption();
        var threads = CliSupport.ThreadsOption();
        var keepCheckpoints = CliSupport.KeepCheckpointsOption();
        var keepEvery = CliSupport.KeepEveryOption();
        var logEvery = CliSupport.LogEveryOption();
        var cmd = new Command("train", "Train in this one process (checkpoints and sample pictures go to the run folder)")
        {
            recipe, set, steps, seed, output, resume, device, threads, keepCheckpoints, keepEvery, logEvery,
        };
        cmd.SetAction(p =>
        {
            var every = p.GetValue(logEvery);
            if (every < 1) throw new UsageException($"--log-every {every}: expected at least 1");
            var retention = CliSupport.UserInput(() => new CheckpointRetention(p.GetValue(keepCheckpoints) ?? CheckpointRetention.DefaultKeepLast, p.GetValue(keepEvery)));
            return Run(p.GetValue(recipe), p.GetValue(set) ?? [], p.GetValue(steps), p.GetValue(seed),
                p.GetValue(output), p.GetValue(resume), p.GetValue(device)!, p.GetValue(threads), retention, every);
        });
        return cmd;
    }

    private static int Run(string? recipeName, string[] sets, int? steps, long? seed, string? outDir, string? resume, string deviceSpec, int threads, CheckpointRetention retention, int logEvery)
    {
        var device = CliSupport.ResolveDevice(deviceSpec, threads);
        // The same rules as serve and run (RunFolder): a damaged newest checkpoint is skipped with a warning, and on
        // resume --recipe, --set and --seed may only restate the run's own recipe.
        using var run = CliSupport.UserInput(() => RunFolder.Open(new RunRequest { Resume = resume, Out = outDir, Recipe = recipeName, Set = sets, Seed = seed, Steps = steps }));
        CliSupport.WarnSkipped(run.Skipped, run.CheckpointFolder);
        var recipe = run.Recipe;
        var runDir = run.RunDir;
        // The recipe keeps the data path as given (relative paths stay relative, so a moved checkout still resumes);
        // only loading uses the resolved folder.
        var (train, heldOut) = DatasetLoader.Load(recipe.WithResolvedDataPath().ToDataOptions());
        using (train)
        using (heldOut)
        {
            Directory.CreateDirectory(runDir);
            File.WriteAllText(Path.Combine(runDir, "recipe.json"), recipe.ToJson());
            var state = run.Checkpoint is null
                ? TrainingState.Create(recipe, train.SampleShape, train.Count, device)
                : TrainingState.FromCheckpoint(run.Checkpoint with { Recipe = recipe }, train.SampleShape, train.Count, device);
            run.Dispose();   // the checkpoint's CPU tensors are copied into the state
            using var stateScope = state;
            var inv = CultureInfo.InvariantCulture;
            Console.Error.WriteLine(string.Create(inv,
                $"training {recipe.Name}: {train.Description}, {train.Count} samples, {state.Network.parameters().Sum(p => p.numel())} parameters, batch {recipe.BatchSize}, T = {recipe.Timesteps}, device {device}, from step {state.StepsDone} to {recipe.Steps}"));
            if (Model.ConvolutionCheck.Path != Model.ConvolutionPath.Unchecked) Console.Error.WriteLine($"convolutions: {Model.ConvolutionCheck.Describe()}");
            var bar = new ProgressBar("train", state.StepsDone, recipe.Steps);
            double smoothed = double.NaN;
            var firstStep = state.StepsDone;
            var clock = new System.Diagnostics.Stopwatch();
            // OUT/metrics.jsonl gets a line every --log-every steps (appended on resume); OUT/loss.png is redrawn at each checkpoint.
            using var tensorBoard = new TensorBoardSink(runDir, m => Console.Error.WriteLine("warning: " + m));   // hook: TensorBoard
            var journal = new MetricsJournal(runDir, tensorBoard);
            var interval = new Observe.StepInterval();
            using var cts = new CancellationTokenSource();
            // Ctrl+C, SIGINT and SIGTERM (kill, Kubernetes) stop after the current step and write a checkpoint; the exit
            // code then says which signal (130, 131, 143), as for `run` and `serve`.
            using (var signals = StopSignals.Register(cts))
            {
                using var trainer = new LocalTrainer(state, train, runDir)
                {
                    OnStep = p =>
                    {
                        // Rate excludes the first step (allocation and one-time set-up).
                        if (p.Step == firstStep + 1) clock.Restart();
                        smoothed = double.IsNaN(smoothed) ? p.Loss : 0.98 * smoothed + 0.02 * p.Loss;
                        bar.Update(p.Step, "loss " + CliSupport.Format(smoothed));
                        interval.Add(p.Loss, recipe.BatchSize);
                        if (p.Step % logEvery == 0 || p.Step == p.TargetStep)
                        {
                            var (meanLoss, rate) = interval.Take();
                            journal.Append(new Observe.StepRecord(p.Step, state.Cursor.Epoch, meanLoss, p.GradNorm, state.Optimizer.LearningRateAt(p.Step), rate, 0));
                        }
                    },
                    OnCheckpoint = saved =>
                    {
                        foreach (var aside in saved.SetAside)
                            Console.Error.WriteLine($"warning: {aside.Folder} was not a valid checkpoint ({aside.Reason}); moved it to {aside.MovedTo}");
                        Console.Error.WriteLine($"checkpoint {saved.Folder}");
                        try
                        {
                            journal.WriteLossPlot(recipe.Name);
                        }
                        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                        {
                            Console.Error.WriteLine($"warning: {journal.LossPlotPath} not written: {e.Message}");
                        }
                        foreach (var gone in saved.Deleted) Console.Error.WriteLine($"deleted checkpoint {gone} ({retention})");
                        foreach (var problem in saved.PruneProblems) Console.Error.WriteLine($"warning: could not delete an old checkpoint: {problem}");
                    },
                    OnCheckpointFailed = (step, e) => Console.Error.WriteLine(
                        $"error: the checkpoint of step {step} was not written: {e.Message.ReplaceLineEndings(" ")}; training goes on and the next checkpoint tries again"),
                    Retention = retention,
                    OnSampleStep = st => Console.Error.WriteLine($"samples {tensorBoard.Picture(st, RunPictures.WriteTrainingSamples(state, runDir, st))}"),
                };
                try
                {
                    trainer.Run(recipe.Steps, cts.Token);
                }
                catch (OperationCanceledException) when (cts.IsCancellationRequested)
                {
                    Console.Error.WriteLine(string.Create(inv, $"stopped at step {state.StepsDone}; resume with --resume {runDir}"));
                    return signals.ExitCode;
                }
            }
            var timed = state.StepsDone - firstStep - 1;
            var rate = timed > 0 ? timed / clock.Elapsed.TotalSeconds : double.NaN;
            var peakMiB = System.Diagnostics.Process.GetCurrentProcess().PeakWorkingSet64 / (1024.0 * 1024.0);
            Console.WriteLine(string.Create(inv,
                $"trained {recipe.Name} to step {state.StepsDone}; final loss {smoothed:G4}; {rate:G3} steps/s ({1 / rate:G3} s/step); peak memory {peakMiB:F0} MiB; run folder {runDir}"));
        }
        return CliSupport.ExitOk;
    }
}
