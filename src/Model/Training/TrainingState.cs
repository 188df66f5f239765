using System.Globalization;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Networks;
using DistDiffusion.Model.Optimization;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Training;

/// <summary>What one step will do: its number, the global batch's dataset indices and the epoch each was drawn in, and the cursor after it.</summary>
public sealed record StepPlan(long Step, long[] Indices, long[] Epochs, DataCursor Next);

/// <summary>
/// The state a training run carries from step to step — network weights, Adam state, EMA weights, step
/// number and data cursor — and the one way it advances: <see cref="ApplyGradients"/> with the gradients
/// of the planned global batch already in the parameters' .grad. The one-process trainer and the
/// distributed coordinator both drive this class, so their updates are the same code.
/// </summary>
public sealed class TrainingState : IDisposable
{
    private TrainingState(Recipe recipe, RecipeModel model, long[] sampleShape, long datasetSize, Device device)
    {
        Recipe = recipe;
        Network = model.Network;
        SampleShape = sampleShape;
        Device = device;
        Schedule = model.Schedule;
        Diffusion = model.Diffusion;
        TrainingStep = model.TrainingStep;
        var named = Network.named_parameters().Select(p => (p.name, p.parameter)).ToList();
        Optimizer = new AdamOptimizer(named, recipe.ToAdamOptions());
        Ema = recipe.EmaDecay > 0 ? new ExponentialMovingAverage(named, recipe.EmaDecay) : null;
        Order = new DataOrder(datasetSize, recipe.Seed);
    }

    public Recipe Recipe { get; }
    public DenoiserNetwork Network { get; }
    public long[] SampleShape { get; }
    public Device Device { get; }
    public NoiseSchedule Schedule { get; }
    public GaussianDiffusion Diffusion { get; }
    public TrainingStep TrainingStep { get; }
    public AdamOptimizer Optimizer { get; }
    public ExponentialMovingAverage? Ema { get; }
    public DataOrder Order { get; }

    /// <summary>Optimizer steps completed.</summary>
    public long StepsDone { get; private set; }
    public DataCursor Cursor { get; private set; } = new(0, 0);

    /// <summary>A fresh run: weights initialized from torch's generator seeded with the recipe's seed.</summary>
    public static TrainingState Create(Recipe recipe, long[] sampleShape, long datasetSize, Device device)
    {
#pragma warning disable CA2000 // ownership passes to the new TrainingState (disposed below if its constructor throws)
        var model = ModelFactory.Create(recipe, device, training: true, sampleShape, initSeed: recipe.Seed);
#pragma warning restore CA2000
        try
        {
            return new TrainingState(recipe, model, sampleShape, datasetSize, device);
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>The run a checkpoint describes, with every tensor restored exactly.</summary>
    public static TrainingState FromCheckpoint(CheckpointData checkpoint, long[] sampleShape, long datasetSize, Device device)
    {
        var state = Create(checkpoint.Recipe, sampleShape, datasetSize, device);
        try
        {
            state.Restore(checkpoint);
            return state;
        }
        catch
        {
            state.Dispose();
            throw;
        }
    }

    /// <summary>The next step's global batch (does not advance anything).</summary>
    public StepPlan PlanStep()
    {
        var (indices, epochs, next) = Order.NextBatch(Cursor, Recipe.BatchSize);
        return new StepPlan(StepsDone, indices, epochs, next);
    }

    /// <summary>
    /// Applies the gradients now in the parameters' .grad (those of <paramref name="plan"/>'s whole global batch):
    /// Adam step, EMA update, step count and cursor advance. A non-finite gradient throws and changes nothing.
    /// With <paramref name="deferEma"/> the EMA update of this step waits for <see cref="FlushEma"/> (or the next update,
    /// checkpoint or sampling-weights read, which flush it first): the distributed coordinator, where it cannot take the
    /// flat step (an accelerator), does it while the workers compute the next step. It uses this step's parameters either
    /// way, so the EMA is the same.
    /// </summary>
    public double ApplyGradients(StepPlan plan, bool deferEma = false)
    {
        BeforeUpdate(plan);
        double norm;
        try
        {
            norm = Optimizer.Step();
        }
        catch
        {
            Optimizer.ZeroGrad();   // never let a rejected gradient accumulate into the next one
            throw;
        }
        AfterUpdate(plan, deferEma);
        Optimizer.ZeroGrad();
        return norm;
    }

    /// <summary>
    /// <see cref="ApplyGradients(StepPlan, bool)"/> from a flat gradient [elements, named_parameters order] of the
    /// parameters marked in <paramref name="present"/> instead of .grad, where <see cref="AdamOptimizer.CanStepFlat"/>
    /// (<see cref="AdamOptimizer.Step(Span{float}, ReadOnlySpan{byte}, Span{float}, ParameterUpdated)"/>): the same update, bit for bit,
    /// with the new parameters written into <paramref name="updated"/> [elements] as well. The distributed coordinator's path.
    /// <para>Where the EMA updates by its element loop, it is updated inside the step, each parameter right after its
    /// Adam update while its new values are in cache (the same bits as a separate update). A separate update is another
    /// pass over memory; in the coordinator it ran while the workers computed, and on 2 cores with 2 local workers it
    /// delayed the second worker's start by its length every step. (The flat step's parameters are CPU float32 tensors, so
    /// are the EMA's clones of them: nothing is left to defer.)</para>
    /// </summary>
    public double ApplyGradients(StepPlan plan, Span<float> gradient, ReadOnlySpan<byte> present, Span<float> updated)
    {
        BeforeUpdate(plan);
        var ema = Ema is { CanUpdateInPlace: true } e ? e : null;
        var factors = ema?.FactorsAt(StepsDone + 1) ?? default;
        var norm = Optimizer.Step(gradient, present, updated, ema is null ? null : (name, values) => ema.UpdateParameter(name, values, factors));
        AfterUpdate(plan, deferEma: false, emaUpdated: ema is not null);
        return norm;
    }

    private void BeforeUpdate(StepPlan plan)
    {
        if (plan.Step != StepsDone)
            throw new InvalidOperationException($"plan is for step {plan.Step} but the run is at step {StepsDone}");
        FlushEma();
    }

    /// <summary>The step count, EMA and cursor move only once the optimizer took the update.</summary>
    private void AfterUpdate(StepPlan plan, bool deferEma, bool emaUpdated = false)
    {
        StepsDone++;
        _emaPending = Ema is not null && !emaUpdated;
        if (!deferEma) FlushEma();
        Cursor = plan.Next;
    }

    private bool _emaPending;

    /// <summary>Brings the EMA up to the parameters of <see cref="StepsDone"/> (a no-op when it is).</summary>
    public void FlushEma()
    {
        if (!_emaPending) return;
        _emaPending = false;
        Ema!.Update(StepsDone);
    }

    /// <summary>Weights to sample with: EMA (default, when the recipe keeps one) or the raw weights.</summary>
    public IReadOnlyDictionary<string, Tensor> SamplingWeights(bool useEma = true)
    {
        FlushEma();
        return useEma && Ema is not null ? Ema.Weights : Network.named_parameters().ToDictionary(p => p.name, p => (Tensor)p.parameter);
    }

    public CheckpointData ToCheckpoint()
    {
        FlushEma();
        return new(
        Recipe, StepsDone, Cursor.Epoch, Cursor.Position, Recipe.Seed,
        Network.named_parameters().ToDictionary(p => p.name, p => (Tensor)p.parameter),
        Ema?.Weights ?? new Dictionary<string, Tensor>(),
        Optimizer.StateTensors(),
        new Dictionary<string, string>
        {
            [CheckpointStore.OptimizerStepKey] = Optimizer.StepCount.ToString(CultureInfo.InvariantCulture),
            [TrainSizeKey] = Order.DatasetSize.ToString(CultureInfo.InvariantCulture),
        });
    }

    /// <summary>Checkpoint fact: the training-set size the data order was planned for.</summary>
    public const string TrainSizeKey = CheckpointStore.TrainSizeKey;

    private void Restore(CheckpointData c)
    {
        if (c.Extra.TryGetValue(TrainSizeKey, out var sizeText) && sizeText != Order.DatasetSize.ToString(CultureInfo.InvariantCulture))
            throw new InvalidDataException($"checkpoint was trained on {sizeText} samples but the data now has {Order.DatasetSize}: resuming would not continue the same run");
        if (!c.Extra.TryGetValue(CheckpointStore.OptimizerStepKey, out var stepText) || !long.TryParse(stepText, NumberStyles.Integer, CultureInfo.InvariantCulture, out var optSteps))
            throw new InvalidDataException($"checkpoint lacks '{CheckpointStore.OptimizerStepKey}'");
        if (c.Step < 0 || c.Epoch < 0 || c.Cursor < 0 || c.Cursor >= Order.DatasetSize || optSteps != c.Step)
            throw new InvalidDataException($"checkpoint position out of range: step {c.Step}, epoch {c.Epoch}, cursor {c.Cursor} of {Order.DatasetSize} samples, {optSteps} optimizer updates (expected step, epoch, cursor >= 0, cursor < the training-set size, updates = step)");
        ModelFactory.LoadWeights(Network, c.Model, "checkpoint");
        Optimizer.LoadState(c.Optimizer, optSteps);
        if (Ema is not null) Ema.Load(c.Ema);
        StepsDone = c.Step;
        Cursor = new DataCursor(c.Epoch, c.Cursor);
    }

    public void Dispose()
    {
        Optimizer.Dispose();
        Ema?.Dispose();
        Network.Dispose();
        Schedule.Dispose();
    }
}
