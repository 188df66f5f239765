using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Training;
using static TorchSharp.torch;

namespace DistDiffusion.Coordinator.Configuration;

/// <summary>A run ready to train: its state (fresh or from the latest checkpoint), the training-split size and the run folder.</summary>
public sealed class RunSetup : IDisposable
{
    private RunSetup(TrainingState state, long trainSize, string runDir, long targetStep, string? resumedFrom, CheckpointRetention retention, (string Folder, long Step)? lastCheckpoint)
    {
        State = state;
        TrainSize = trainSize;
        RunDir = runDir;
        TargetStep = targetStep;
        ResumedFrom = resumedFrom;
        Retention = retention;
        LastCheckpoint = lastCheckpoint;
    }

    public TrainingState State { get; }
    public long TrainSize { get; }
    public string RunDir { get; }
    public long TargetStep { get; }
    public string? ResumedFrom { get; }
    /// <summary>Which checkpoints the loop keeps after writing a new one.</summary>
    public CheckpointRetention Retention { get; }
    /// <summary>This run folder's checkpoint the state came from (null: a fresh run, or one branched off another run).</summary>
    public (string Folder, long Step)? LastCheckpoint { get; }

    /// <summary>
    /// Opens the run as every training verb does (<see cref="RunFolder"/>): `--resume DIR` continues DIR's newest readable
    /// checkpoint (damaged newer ones are skipped with a warning), or starts the run there when it has none and a recipe is
    /// given (a Kubernetes coordinator's first start); otherwise `--recipe` and `--out` start a new run.
    /// </summary>
    public static RunSetup Create(CoordinatorOptions o, ILogger log)
    {
        if (o.SampleOnly) return ForSampling(o, log);
        using var run = RunFolder.Open(new RunRequest { Resume = o.Resume, Out = o.Out, Recipe = o.Recipe, Set = o.Set, Seed = o.Seed, Steps = o.Steps });
        foreach (var skipped in run.Skipped)
            log.LogWarning("Checkpoint {Folder} cannot be read, skipped: {Reason}", skipped.Folder, skipped.Reason);
        if (run.CheckpointFolder is { } from)
            log.LogInformation("Resuming {Folder} (step {Step})", from, run.Checkpoint!.Step);
        var recipe = run.Recipe;
        var device = DistDiffusion.Model.TorchRuntime.ResolveDevice(o.Device, o.Threads);
        var (train, heldOut) = DatasetLoader.Load(recipe.WithResolvedDataPath().ToDataOptions());
        using (train)
        using (heldOut)
        {
            Directory.CreateDirectory(run.RunDir);
            File.WriteAllText(Path.Combine(run.RunDir, "recipe.json"), recipe.ToJson());
            var state = run.Checkpoint is null
                ? TrainingState.Create(recipe, train.SampleShape, train.Count, device)
                : TrainingState.FromCheckpoint(run.Checkpoint with { Recipe = recipe }, train.SampleShape, train.Count, device);
            return new RunSetup(state, train.Count, run.RunDir, recipe.Steps, run.CheckpointFolder, o.Retention(), run.LastCheckpointInRun);
        }
    }

    /// <summary>A trained model to serve: the checkpoint's state (a run folder's newest readable one), no dataset needed.</summary>
    private static RunSetup ForSampling(CoordinatorOptions o, ILogger log)
    {
        var (checkpoint, folder, skipped) = RunFolder.LoadNewestReadable(o.Checkpoint!);
        foreach (var s in skipped)
            log.LogWarning("Checkpoint {Folder} cannot be read, skipped: {Reason}", s.Folder, s.Reason);
        try
        {
            var trainSize = checkpoint.Extra.TryGetValue(TrainingState.TrainSizeKey, out var text) && long.TryParse(text, System.Globalization.CultureInfo.InvariantCulture, out var n) ? n : Math.Max(1, checkpoint.Cursor + 1);
            var device = DistDiffusion.Model.TorchRuntime.ResolveDevice(o.Device, o.Threads);
            var state = TrainingState.FromCheckpoint(checkpoint, checkpoint.Recipe.SampleShape, trainSize, device);
            return new RunSetup(state, trainSize, Path.GetFullPath(Path.Combine(folder, "..", "..")), checkpoint.Step, folder, o.Retention(), (folder, checkpoint.Step));
        }
        finally
        {
            checkpoint.DisposeTensors();
        }
    }

    public void Dispose() => State.Dispose();
}
