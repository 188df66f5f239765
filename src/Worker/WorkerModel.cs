using DistDiffusion.Model.Data;
using DistDiffusion.Model.Networks;
using DistDiffusion.Model.Training;
using DistDiffusion.Protocol;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Worker;

/// <summary>
/// What a worker computes with for one run: its copy of the recipe's network, the training split (loaded
/// locally on the first training assignment: a worker that only samples needs no data), and the loss of
/// Algorithm 1. Kept across reconnects while the recipe stays the same.
/// </summary>
internal sealed class WorkerModel : IDisposable
{
    private Dataset? _train;
    private Dataset? _heldOut;

    private WorkerModel(string recipeJson, Recipe recipe, DenoiserNetwork network, TrainingStep step, Device device)
    {
        RecipeJson = recipeJson;
        Recipe = recipe;
        Network = network;
        Step = step;
        Device = device;
        Vector = ParameterVector.Of(network);
    }

    public string RecipeJson { get; }
    public Recipe Recipe { get; }
    public DenoiserNetwork Network { get; }
    public TrainingStep Step { get; }
    public Device Device { get; }
    public ParameterVector Vector { get; }
    /// <summary>Version of the parameters now in <see cref="Network"/> (null: none received yet).</summary>
    public ulong? ParameterVersion { get; set; }

    public static WorkerModel Load(string recipeJson, Device device)
    {
        var recipe = Recipe.FromJson(recipeJson);
        recipe.Validate();
        var network = NetworkFactory.Create(recipe, recipe.SampleShape);
        network.to(device);
        network.train();
        var schedule = Model.Diffusion.NoiseSchedule.Create(recipe.BetaSchedule, recipe.Timesteps, recipe.BetaStart, recipe.BetaEnd);
        var diffusion = new Model.Diffusion.GaussianDiffusion(schedule, recipe.Prediction, recipe.Variance, recipe.Loss, recipe.Reduction, discreteData: recipe.IsImageData);
        return new WorkerModel(recipeJson, recipe, network, new TrainingStep(diffusion, recipe.Seed, recipe.RandomFlip), device);
    }

    /// <summary>The training split, loaded on first use; it must have the coordinator's <paramref name="expectedSize"/>.</summary>
    public Dataset Train(long expectedSize)
    {
        if (_train is null)
        {
            var (train, heldOut) = DatasetLoader.Load(DatasetLoader.ResolveDataPath(Recipe));
            (_train, _heldOut) = (train, heldOut);
        }
        if (_train.Count != expectedSize)
            throw new ProtocolException(Grpc.Core.StatusCode.FailedPrecondition,
                $"this worker's training split has {_train.Count} samples but the coordinator's has {expectedSize}: the dataset at '{Recipe.DataPath}' differs");
        return _train;
    }

    /// <summary>
    /// The gradient of one slice: L_simple of the samples at <paramref name="indices"/> with their seeds, divided by
    /// the global batch size, backpropagated. Returns the gradient bytes (float32), the presence bitmap and the slice's loss.
    /// </summary>
    public (byte[] Gradient, byte[] Present, double Loss) Gradient(Dataset train, ReadOnlySpan<long> indices, ReadOnlySpan<ulong> seeds, int globalBatch)
    {
        var values = new byte[Vector.Elements * 4];
        var (present, loss) = Gradient(train, indices, seeds, globalBatch, values);
        return (values, present, loss);
    }

    /// <summary>As above, the gradient written into <paramref name="values"/> [Elements * 4 bytes] (a pooled or shared buffer).</summary>
    public (byte[] Present, double Loss) Gradient(Dataset train, ReadOnlySpan<long> indices, ReadOnlySpan<ulong> seeds, int globalBatch, Span<byte> values)
    {
        using var guard = Model.TorchRuntime.Compute();   // other threads allocate: temporaries must outlive their native calls
        Network.zero_grad(set_to_none: true);   // presence then means "this slice touched it"
        double loss;
        using (var scope = NewDisposeScope())
        {
            var x0 = train.Gather(indices).to(Device);
            var l = Step.Loss(Network, x0, seeds, globalBatch);
            l.backward();
            loss = l.to_type(ScalarType.Float64).item<double>();
        }
        var present = Vector.ReadGradients(values);
        Network.zero_grad(set_to_none: true);
        return (present, loss);
    }

    public void Dispose()
    {
        Network.Dispose();
        Step.Diffusion.Schedule.Dispose();
        _train?.Dispose();
        _heldOut?.Dispose();
    }
}
