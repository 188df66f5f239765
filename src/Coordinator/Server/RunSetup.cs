using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Training;
using Microsoft.Extensions.Logging;
using static TorchSharp.torch;

namespace DistDiffusion.Coordinator.Server;

/// <summary>A run ready to train: its state (fresh or from the latest checkpoint), the training-split size and the run folder.</summary>
public sealed class RunSetup : IDisposable
{
    private RunSetup(TrainingState state, long trainSize, string runDir, long targetStep, string? resumedFrom, CheckpointRetention retention)
    {
        State = state;
        TrainSize = trainSize;
        RunDir = runDir;
        TargetStep = targetStep;
        ResumedFrom = resumedFrom;
        Retention = retention;
        // The checkpoint the state came from counts as this run's last one when it lies in this run folder.
        if (resumedFrom is not null && string.Equals(Path.GetFullPath(Path.Combine(resumedFrom, "..", "..")).TrimEnd(Path.DirectorySeparatorChar), runDir.TrimEnd(Path.DirectorySeparatorChar), StringComparison.Ordinal))
            LastCheckpoint = (resumedFrom, state.StepsDone);
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
    /// `--resume DIR` continues DIR's latest checkpoint (or starts a new run there when it has none and a recipe is
    /// given: a Kubernetes coordinator's first start); otherwise `--recipe` and `--out` start a new run.
    /// </summary>
    public static RunSetup Create(CoordinatorOptions o, ILogger log)
    {
        if (o.SampleOnly) return ForSampling(o);
        CheckpointData? checkpoint = null;
        Recipe recipe;
        string runDir;
        string? resumedFrom = null;
        var resumable = o.Resume is not null && Directory.Exists(Path.Combine(o.Resume, "checkpoints")) && CheckpointStore.List(o.Resume).Count > 0;
        if (o.Resume is not null && (resumable || File.Exists(Path.Combine(o.Resume, "manifest.json"))))
        {
            var folder = CheckpointStore.ResolveCheckpointFolder(o.Resume);
            checkpoint = CheckpointStore.Load(folder);
            recipe = checkpoint.Recipe;
            resumedFrom = folder;
            runDir = Path.GetFullPath(o.Out ?? (resumable ? o.Resume : Path.Combine(folder, "..", "..")));
            if (o.Recipe is not null && o.Recipe != recipe.Name)
                log.LogWarning("Resuming {Folder}: its recipe {Recipe} is used, --recipe {Given} is ignored", folder, recipe.Name, o.Recipe);
        }
        else
        {
            if (o.Recipe is null)
                throw new ArgumentException(o.Resume is null
                    ? "--recipe NAME is required for a new run (or --resume DIR to continue one)"
                    : $"--resume {o.Resume}: no checkpoint there yet; give --recipe NAME to start the run in that folder");
            var outDir = o.Out ?? o.Resume ?? throw new ArgumentException("--out DIR is required for a new run");
            recipe = Recipes.Get(o.Recipe).WithOverrides(o.Set);
            if (o.Seed is { } seed) recipe = recipe with { Seed = seed };
            runDir = Path.GetFullPath(outDir);
            if (Directory.Exists(Path.Combine(runDir, "checkpoints")) && CheckpointStore.List(runDir).Count > 0)
                throw new ArgumentException($"--out {outDir}: already holds a run with checkpoints; use --resume {outDir} to continue it or choose another folder");
        }
        if (o.Steps is { } n) recipe = recipe with { Steps = n };
        recipe.Validate();
        var device = DistDiffusion.Model.TorchRuntime.ResolveDevice(o.Device, o.Threads);
        var (train, heldOut) = DatasetLoader.Load(DatasetLoader.ResolveDataPath(recipe));
        using (train)
        using (heldOut)
        {
            Directory.CreateDirectory(runDir);
            File.WriteAllText(Path.Combine(runDir, "recipe.json"), recipe.ToJson());
            try
            {
                var state = checkpoint is null
                    ? TrainingState.Create(recipe, train.SampleShape, train.Count, device)
                    : TrainingState.FromCheckpoint(checkpoint with { Recipe = recipe }, train.SampleShape, train.Count, device);
                return new RunSetup(state, train.Count, runDir, recipe.Steps, resumedFrom, o.Retention());
            }
            finally
            {
                checkpoint?.DisposeTensors();
            }
        }
    }

    /// <summary>A trained model to serve: the checkpoint's state, no dataset needed (sample shape from the recipe).</summary>
    private static RunSetup ForSampling(CoordinatorOptions o)
    {
        var folder = CheckpointStore.ResolveCheckpointFolder(o.Checkpoint!);
        var checkpoint = CheckpointStore.Load(folder);
        try
        {
            var trainSize = checkpoint.Extra.TryGetValue(TrainingState.TrainSizeKey, out var text) && long.TryParse(text, System.Globalization.CultureInfo.InvariantCulture, out var n) ? n : Math.Max(1, checkpoint.Cursor + 1);
            var device = DistDiffusion.Model.TorchRuntime.ResolveDevice(o.Device, o.Threads);
            var state = TrainingState.FromCheckpoint(checkpoint, checkpoint.Recipe.SampleShape, trainSize, device);
            return new RunSetup(state, trainSize, Path.GetFullPath(Path.Combine(folder, "..", "..")), checkpoint.Step, folder, o.Retention());
        }
        finally
        {
            checkpoint.DisposeTensors();
        }
    }

    public void Dispose() => State.Dispose();
}
