using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Networks;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Training;

/// <summary>
/// What a recipe builds: its denoiser, noise schedule, Gaussian diffusion and the training step's loss. Owns the
/// network and the schedule (the diffusion and the step only refer to them).
/// </summary>
public sealed class RecipeModel : IDisposable
{
    internal RecipeModel(DenoiserNetwork network, NoiseSchedule schedule, GaussianDiffusion diffusion, TrainingStep step)
    {
        Network = network;
        Schedule = schedule;
        Diffusion = diffusion;
        TrainingStep = step;
    }

    public DenoiserNetwork Network { get; }
    public NoiseSchedule Schedule { get; }
    public GaussianDiffusion Diffusion { get; }
    public TrainingStep TrainingStep { get; }

    public void Dispose()
    {
        Network.Dispose();
        Schedule.Dispose();
    }
}

/// <summary>
/// The one path from a recipe to a model (improved-diffusion's create_model_and_diffusion): the training state, a
/// worker, a sampling model and the micro-batch replicas all build their parts here, and load weights with
/// <see cref="LoadWeights"/>.
/// </summary>
public static class ModelFactory
{
    /// <summary>
    /// Validates <paramref name="recipe"/> and builds its network (on <paramref name="device"/>, in training or eval mode),
    /// schedule, diffusion and training step.
    /// </summary>
    /// <param name="sampleShape">per-sample shape; the recipe's <see cref="Recipe.SampleShape"/> when null.</param>
    /// <param name="initSeed">seeds torch's generator before the network's weights are initialized (a fresh run);
    /// null leaves it alone (weights about to be overwritten).</param>
    public static RecipeModel Create(Recipe recipe, Device device, bool training, long[]? sampleShape = null, long? initSeed = null)
    {
        ArgumentNullException.ThrowIfNull(recipe);
        recipe.Validate();
        var network = Network(recipe, device, training, sampleShape, initSeed);
        NoiseSchedule? schedule = null;
        try
        {
            schedule = Schedule(recipe);
            var diffusion = Diffusion(recipe, schedule);
            return new RecipeModel(network, schedule, diffusion, new TrainingStep(diffusion, recipe.Seed, recipe.RandomFlip, recipe.Classes > 0 ? recipe.LabelDropout : 0));
        }
        catch
        {
            schedule?.Dispose();
            network.Dispose();
            throw;
        }
    }

    /// <summary>The recipe's network alone, e.g. another replica whose weights will be copied in.</summary>
    public static DenoiserNetwork Network(Recipe recipe, Device device, bool training, long[]? sampleShape = null, long? initSeed = null)
    {
        ArgumentNullException.ThrowIfNull(recipe);
        DenoiserNetwork network;
        lock (Randomness.GlobalGeneratorLock)   // seeding and every draw of the initial weights, with no other module built in between
        {
            if (initSeed is { } seed) random.manual_seed(Randomness.WeightInit(seed));
            network = NetworkFactory.Create(recipe.ToNetworkOptions(), sampleShape ?? recipe.SampleShape);
        }
        try
        {
            network.to(device);
            if (training) network.train();
            else network.eval();
            return network;
        }
        catch
        {
            network.Dispose();
            throw;
        }
    }

    public static NoiseSchedule Schedule(Recipe recipe) =>
        NoiseSchedule.Create(recipe.BetaSchedule, recipe.Timesteps, recipe.BetaStart, recipe.BetaEnd);

    public static GaussianDiffusion Diffusion(Recipe recipe, NoiseSchedule schedule) =>
        new(schedule, recipe.Prediction, recipe.Variance, recipe.Loss, recipe.Reduction, discreteData: recipe.IsImageData,
            weighting: recipe.LossWeighting, minSnrGamma: recipe.MinSnrGamma);

    /// <summary>
    /// Copies named <paramref name="weights"/> into <paramref name="network"/>'s parameters after checking that every
    /// parameter is present with its shape (nothing is copied when one is not).
    /// </summary>
    /// <param name="source">what the weights are, for the message: "checkpoint", "weights of recipe 'x'".</param>
    /// <exception cref="InvalidDataException">a parameter missing or of another shape.</exception>
    public static void LoadWeights(nn.Module network, IReadOnlyDictionary<string, Tensor> weights, string source)
    {
        ArgumentNullException.ThrowIfNull(network);
        ArgumentNullException.ThrowIfNull(weights);
        var named = network.named_parameters().ToList();
        foreach (var (name, p) in named)
        {
            if (!weights.TryGetValue(name, out var w))
                throw new InvalidDataException($"{source} lacks weight '{name}'");
            if (!w.shape.SequenceEqual(p.shape))
                throw new InvalidDataException($"{source}: weight '{name}' has shape [{string.Join(",", w.shape)}], expected [{string.Join(",", p.shape)}]");
        }
        using (no_grad())
            foreach (var (name, p) in named) p.copy_(weights[name]);
    }
}
