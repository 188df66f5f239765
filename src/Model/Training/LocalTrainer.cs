using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Data;

namespace DistDiffusion.Model.Training;

/// <summary>Progress of a training run after a step.</summary>
public readonly record struct TrainingProgress(long Step, long TargetStep, double Loss, double GradNorm);

/// <summary>
/// The one-process trainer: the reference the distributed trainer must match, bit for bit. Each step computes the
/// gradient of the whole global batch as the root of the recipe's micro-batch tree (<see cref="MicroBatchGradients"/>,
/// the code a worker runs for its nodes), writes it into the parameters' .grad and hands it to
/// <see cref="TrainingState.ApplyGradients"/>; checkpoints and sample pictures are written to the run folder.
/// </summary>
public sealed class LocalTrainer : IDisposable
{
    private readonly TrainingState _state;
    private readonly Dataset _train;
    private readonly string _runDir;
    private readonly MicroBatchGradients _gradients;
    private readonly ParameterVector _vector;
    private readonly float[] _total;

    public LocalTrainer(TrainingState state, Dataset train, string runDir)
    {
        if (train.Count != state.Order.DatasetSize)
            throw new ArgumentException($"the training set has {train.Count} samples but the run was planned for {state.Order.DatasetSize}");
        _state = state;
        _train = train;
        _runDir = runDir;
        _gradients = new MicroBatchGradients(state.Recipe, state.Network, state.TrainingStep, state.Device, TorchRuntime.ConfiguredThreads);
        state.Optimizer.UpdateThreads = Math.Max(1, TorchRuntime.ConfiguredThreads);   // parameters in parallel; each one's bits are fixed
        _vector = ParameterVector.Of(state.Network);
        _total = new float[_vector.Elements];
    }

    /// <summary>Called after each step.</summary>
    public Action<TrainingProgress>? OnStep { get; init; }
    /// <summary>Called with each checkpoint written and verified (and what it moved aside or retention deleted).</summary>
    public Action<SavedCheckpoint>? OnCheckpoint { get; init; }
    /// <summary>
    /// Called with the step and the error when a checkpoint could not be written (disk full, I/O error, a path in the way):
    /// training goes on and the next checkpoint tries again.
    /// </summary>
    public Action<long, Exception>? OnCheckpointFailed { get; init; }
    /// <summary>Which checkpoints to keep once a new one is verified (default: the last 5).</summary>
    public CheckpointRetention Retention { get; init; } = CheckpointRetention.Default;
    /// <summary>How often the checkpoint at the end (or on cancellation) is tried before <see cref="Run"/> gives up with an IOException.</summary>
    public int FinalCheckpointAttempts { get; init; } = 3;
    /// <summary>Pause before the second try of the final checkpoint (doubled before each further one).</summary>
    public TimeSpan FinalCheckpointRetryPause { get; init; } = TimeSpan.FromSeconds(1);
    /// <summary>The step of the last checkpoint this trainer wrote (-1: none yet).</summary>
    public long LastCheckpointStep { get; private set; } = -1;
    /// <summary>The folder of the last checkpoint this trainer wrote (null: none yet).</summary>
    public string? LastCheckpoint { get; private set; }
    /// <summary>Called after each periodic step with the step number, to write sample pictures (null: none).</summary>
    public Action<long>? OnSampleStep { get; init; }

    /// <summary>One training step on the planned global batch; returns (loss, gradient norm).</summary>
    public (double Loss, double GradNorm) TrainStep()
    {
        var plan = _state.PlanStep();
        var keys = _state.TrainingStep.SampleKeys(plan.Step, plan.Indices, plan.Epochs);
        var gradient = _gradients.Compute(_gradients.Tree.Root, _train, plan.Indices, keys, plan.Step, _total);
        _vector.WriteGradients(_total, gradient.Present);
        var norm = _state.ApplyGradients(plan);
        return (gradient.Loss, norm);
    }

    /// <summary>
    /// Trains until <paramref name="targetStep"/> steps are done. Checkpoints every recipe.CheckpointEvery steps
    /// and at the end; on cancellation writes a checkpoint of the last completed step before rethrowing. A periodic
    /// checkpoint that fails is reported to <see cref="OnCheckpointFailed"/> and training goes on; the final one is tried
    /// <see cref="FinalCheckpointAttempts"/> times, then an <see cref="IOException"/> says which step was not saved.
    /// </summary>
    public void Run(long targetStep, CancellationToken ct = default)
    {
        var recipe = _state.Recipe;
        var firstStep = _state.StepsDone;
        _state.Network.train();
        try
        {
            while (_state.StepsDone < targetStep)
            {
                ct.ThrowIfCancellationRequested();
                var (loss, norm) = TrainStep();
                var step = _state.StepsDone;
                OnStep?.Invoke(new TrainingProgress(step, targetStep, loss, norm));
                if (recipe.CheckpointEvery > 0 && step % recipe.CheckpointEvery == 0 && step < targetStep)
                    TrySaveCheckpoint();
                if (recipe.SampleEvery > 0 && step % recipe.SampleEvery == 0 && step < targetStep)
                    OnSampleStep?.Invoke(step);
            }
        }
        finally
        {
            // Nothing to write when this step's checkpoint exists: written here, or the valid one the run resumed from.
            var saved = _state.StepsDone == LastCheckpointStep
                || (_state.StepsDone == firstStep && IsValidCheckpoint(_state.StepsDone));
            if (!saved)
                SaveFinalCheckpoint();
        }
        OnSampleStep?.Invoke(_state.StepsDone);
    }

    private bool IsValidCheckpoint(long step)
    {
        var folder = Path.Combine(_runDir, CheckpointStore.CheckpointsFolderName, step.ToString(System.Globalization.CultureInfo.InvariantCulture));
        if (!Directory.Exists(folder)) return false;
        try
        {
            return CheckpointStore.Verify(folder) == step;
        }
        catch (IOException)
        {
            return false;   // damaged: the save moves it aside and writes this step again
        }
    }

    /// <summary>Writes a checkpoint of the current step; false (after telling <see cref="OnCheckpointFailed"/>) when the disk refused.</summary>
    public bool TrySaveCheckpoint()
    {
        var step = _state.StepsDone;
        try
        {
            var saved = CheckpointStore.Write(_runDir, _state.ToCheckpoint(), Retention);
            (LastCheckpoint, LastCheckpointStep) = (saved.Folder, saved.Step);
            OnCheckpoint?.Invoke(saved);
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            _lastSaveError = e;
            OnCheckpointFailed?.Invoke(step, e);
            return false;
        }
    }

    private Exception? _lastSaveError;

    private void SaveFinalCheckpoint()
    {
        var attempts = Math.Max(1, FinalCheckpointAttempts);
        var pause = FinalCheckpointRetryPause;
        for (var attempt = 1; attempt <= attempts; attempt++)
        {
            if (TrySaveCheckpoint()) return;
            if (attempt < attempts)
            {
                Thread.Sleep(pause);
                pause *= 2;
            }
        }
        throw new IOException($"the checkpoint of step {_state.StepsDone} could not be written in {attempts} attempts ({_lastSaveError?.Message}); "
            + (LastCheckpoint is null ? "this run wrote no checkpoint" : $"the last one written is {LastCheckpoint} (step {LastCheckpointStep})"), _lastSaveError);
    }

    public void Dispose() => _gradients.Dispose();
}
