using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Sampling;
using static TorchSharp.torch;

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
        _gradients = new MicroBatchGradients(state.Recipe, state.Network, state.Step, state.Device, get_num_threads());
        state.Optimizer.UpdateThreads = Math.Max(1, get_num_threads());   // parameters in parallel; each one's bits are fixed
        _vector = ParameterVector.Of(state.Network);
        _total = new float[_vector.Elements];
    }

    /// <summary>Called after each step.</summary>
    public Action<TrainingProgress>? OnStep { get; init; }
    /// <summary>Called with the folder of each checkpoint written.</summary>
    public Action<string>? OnCheckpoint { get; init; }
    /// <summary>Called after each periodic step with the step number, to write sample pictures (null: none).</summary>
    public Action<long>? OnSampleStep { get; init; }

    /// <summary>One training step on the planned global batch; returns (loss, gradient norm).</summary>
    public (double Loss, double GradNorm) TrainStep()
    {
        var plan = _state.PlanStep();
        var keys = _state.Step.SampleKeys(plan.Step, plan.Indices, plan.Epochs);
        var gradient = _gradients.Compute(_gradients.Tree.Root, _train, plan.Indices, keys, plan.Step, _total);
        _vector.WriteGradients(_total, gradient.Present);
        var norm = _state.ApplyGradients(plan);
        return (gradient.Loss, norm);
    }

    /// <summary>
    /// Trains until <paramref name="targetStep"/> steps are done. Checkpoints every recipe.CheckpointEvery steps
    /// and at the end; on cancellation writes a checkpoint of the last completed step before rethrowing.
    /// </summary>
    public void Run(long targetStep, CancellationToken ct = default)
    {
        var recipe = _state.Recipe;
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
                    SaveCheckpoint();
                if (recipe.SampleEvery > 0 && step % recipe.SampleEvery == 0 && step < targetStep)
                    OnSampleStep?.Invoke(step);
            }
        }
        finally
        {
            if (!CheckpointExists(_state.StepsDone))
                SaveCheckpoint();
        }
        OnSampleStep?.Invoke(_state.StepsDone);
    }

    private bool CheckpointExists(long step) =>
        Directory.Exists(Path.Combine(_runDir, "checkpoints")) && CheckpointStore.List(_runDir).Any(c => c.Step == step);

    public string SaveCheckpoint()
    {
        var folder = CheckpointStore.Save(_runDir, _state.ToCheckpoint());
        OnCheckpoint?.Invoke(folder);
        return folder;
    }

    public void Dispose() => _gradients.Dispose();
}
