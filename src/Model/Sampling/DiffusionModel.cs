using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Networks;
using DistDiffusion.Model.Training;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Sampling;

/// <summary>
/// A trained model ready to sample or evaluate: the recipe, a network holding one set of weights (EMA or
/// raw) and the diffusion it was trained with. Owns its network and schedule.
/// </summary>
public sealed class DiffusionModel : IDisposable
{
    private readonly RecipeModel _parts;

    private DiffusionModel(Recipe recipe, RecipeModel parts, Device device)
    {
        Recipe = recipe;
        _parts = parts;
        Device = device;
    }

    public Recipe Recipe { get; }
    public DenoiserNetwork Network => _parts.Network;
    public NoiseSchedule Schedule => _parts.Schedule;
    public GaussianDiffusion Diffusion => _parts.Diffusion;
    public Device Device { get; }
    public long[] SampleShape => Recipe.SampleShape;

    /// <summary>A model from named weights (e.g. a checkpoint's EMA or raw weights); every parameter must be present with its shape.</summary>
    public static DiffusionModel FromWeights(Recipe recipe, IReadOnlyDictionary<string, Tensor> weights, Device device) =>
        Load(recipe, device, network => ModelFactory.LoadWeights(network, weights, $"weights for recipe '{recipe.Name}'"));

    /// <summary>A model from the flat parameter vector a worker receives (<see cref="ParameterVector"/> order, [Elements]).</summary>
    public static DiffusionModel FromVector(Recipe recipe, float[] values, Device device) =>
        Load(recipe, device, network => ParameterVector.Of(network).WriteValues(values));

    private static DiffusionModel Load(Recipe recipe, Device device, Action<DenoiserNetwork> load)
    {
        var parts = ModelFactory.Create(recipe, device, training: false);
        try
        {
            load(parts.Network);
            return new DiffusionModel(recipe, parts, device);
        }
        catch
        {
            parts.Dispose();
            throw;
        }
    }

    /// <summary>The checkpoint's EMA weights (when it has them and <paramref name="useEma"/>) or its raw weights.</summary>
    public static DiffusionModel FromCheckpoint(CheckpointData checkpoint, bool useEma, Device device) =>
        FromWeights(checkpoint.Recipe, useEma && checkpoint.Ema.Count > 0 ? checkpoint.Ema : checkpoint.Model, device);

    /// <summary>A snapshot of a training run's current weights (EMA by default).</summary>
    public static DiffusionModel FromTrainingState(TrainingState state, bool useEma = true) =>
        FromWeights(state.Recipe, state.SamplingWeights(useEma), state.Device);

    public SamplingResult Sample(SamplingRequest request, int batchSize = 256, Action<int>? onSamplesDone = null, CancellationToken ct = default) =>
        SamplingPipeline.Run(Network, Diffusion, Recipe.ClipDenoised, request, SampleShape, Device, batchSize, onSamplesDone, Recipe.Guidance, ct);

    public void Dispose() => _parts.Dispose();
}
