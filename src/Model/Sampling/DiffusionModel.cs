using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Networks;
using DistDiffusion.Model.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Sampling;

/// <summary>
/// A trained model ready to sample or evaluate: the recipe, a network holding one set of weights (EMA or
/// raw) and the diffusion it was trained with. Owns its network and schedule.
/// </summary>
public sealed class DiffusionModel : IDisposable
{
    private DiffusionModel(Recipe recipe, DenoiserNetwork network, NoiseSchedule schedule, Device device)
    {
        Recipe = recipe;
        Network = network;
        Schedule = schedule;
        Device = device;
        Diffusion = new GaussianDiffusion(schedule, recipe.Prediction, recipe.Variance, recipe.Loss, recipe.Reduction, recipe.IsImageData);
    }

    public Recipe Recipe { get; }
    public DenoiserNetwork Network { get; }
    public NoiseSchedule Schedule { get; }
    public GaussianDiffusion Diffusion { get; }
    public Device Device { get; }
    public long[] SampleShape => Recipe.SampleShape;

    /// <summary>A model from named weights (e.g. a checkpoint's EMA or raw weights); every parameter must be present with its shape.</summary>
    public static DiffusionModel FromWeights(Recipe recipe, IReadOnlyDictionary<string, Tensor> weights, Device device)
    {
        var network = NetworkFactory.Create(recipe, recipe.SampleShape);
        try
        {
            var named = network.named_parameters().ToList();
            foreach (var (name, p) in named)
            {
                if (!weights.TryGetValue(name, out var w))
                    throw new InvalidDataException($"weights lack '{name}' (recipe '{recipe.Name}' expects it)");
                if (!w.shape.SequenceEqual(p.shape))
                    throw new InvalidDataException($"weight '{name}' has shape [{string.Join(",", w.shape)}], expected [{string.Join(",", p.shape)}]");
            }
            using (no_grad())
                foreach (var (name, p) in named) p.copy_(weights[name]);
            network.to(device);
            network.eval();
            var schedule = NoiseSchedule.Create(recipe.BetaSchedule, recipe.Timesteps, recipe.BetaStart, recipe.BetaEnd);
            return new DiffusionModel(recipe, network, schedule, device);
        }
        catch
        {
            network.Dispose();
            throw;
        }
    }

    /// <summary>The checkpoint's EMA weights (when it has them and <paramref name="useEma"/>) or its raw weights.</summary>
    public static DiffusionModel FromCheckpoint(CheckpointData checkpoint, bool useEma, Device device) =>
        FromWeights(checkpoint.Recipe, useEma && checkpoint.Ema.Count > 0 ? checkpoint.Ema : checkpoint.Model, device);

    /// <summary>A snapshot of a training run's current weights (EMA by default).</summary>
    public static DiffusionModel FromTrainingState(TrainingState state, bool useEma = true) =>
        FromWeights(state.Recipe, state.SamplingWeights(useEma), state.Device);

    public SampleResult Sample(SampleRequest request, int batchSize = 256, Action<int>? onSamplesDone = null, CancellationToken ct = default) =>
        SamplingPipeline.Run(Network, Diffusion, Recipe.ClipDenoised, request, SampleShape, Device, batchSize, onSamplesDone, ct);

    public void Dispose()
    {
        Network.Dispose();
        Schedule.Dispose();
    }
}
