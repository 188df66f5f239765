using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Sampling;
using DistDiffusion.Model.Training;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Training;

public class ModelFactoryTests
{
    private static Recipe Small => Recipes.SwissRoll with { HiddenSize = 16, HiddenLayers = 2, TimeEmbeddingSize = 8, Timesteps = 20 };

    [Fact]
    public void CreateBuildsTheRecipesPartsAndSeededInitIsReproducible()
    {
        using var a = ModelFactory.Create(Small, CPU, training: true, initSeed: 7);
        using var b = ModelFactory.Create(Small, CPU, training: false, initSeed: 7);
        Assert.Equal(20, a.Diffusion.T);
        Assert.Same(a.Diffusion, a.TrainingStep.Diffusion);
        Assert.Same(a.Schedule, a.Diffusion.Schedule);
        Assert.Equal(Small.Seed, a.TrainingStep.RunSeed);
        Assert.True(a.Network.training);
        Assert.False(b.Network.training);
        var va = ParameterVector.Of(a.Network).ReadValues();
        Assert.Equal(va, ParameterVector.Of(b.Network).ReadValues());
    }

    [Fact]
    public void CreateValidatesTheRecipe()
    {
        var e = Assert.Throws<ArgumentException>(() => ModelFactory.Create(Small with { LearningRate = 0 }, CPU, training: true));
        Assert.Contains("learning-rate", e.Message);
    }

    [Fact]
    public void LoadWeightsChecksEveryNameAndShapeBeforeCopyingAny()
    {
        using var source = ModelFactory.Create(Small, CPU, training: false, initSeed: 1);
        using var target = ModelFactory.Create(Small, CPU, training: false, initSeed: 2);
        var before = ParameterVector.Of(target.Network).ReadValues();
        var weights = source.Network.named_parameters().ToDictionary(p => p.name, p => (Tensor)p.parameter);
        var last = weights.Keys.Last();

        using var wrong = zeros(3, 3);
        var badShape = new Dictionary<string, Tensor>(weights) { [last] = wrong };
        var e = Assert.Throws<InvalidDataException>(() => ModelFactory.LoadWeights(target.Network, badShape, "test weights"));
        Assert.Contains(last, e.Message);
        Assert.Contains("shape", e.Message);
        var missing = new Dictionary<string, Tensor>(weights);
        missing.Remove(last);
        e = Assert.Throws<InvalidDataException>(() => ModelFactory.LoadWeights(target.Network, missing, "test weights"));
        Assert.Contains($"lacks weight '{last}'", e.Message);
        Assert.Equal(before, ParameterVector.Of(target.Network).ReadValues());   // nothing copied

        ModelFactory.LoadWeights(target.Network, weights, "test weights");
        Assert.Equal(ParameterVector.Of(source.Network).ReadValues(), ParameterVector.Of(target.Network).ReadValues());
    }

    [Fact]
    public void AModelFromAParameterVectorEqualsTheModelFromNamedWeights()
    {
        using var source = ModelFactory.Create(Small, CPU, training: true, initSeed: 3);
        var weights = source.Network.named_parameters().ToDictionary(p => p.name, p => (Tensor)p.parameter);
        var bytes = ParameterVector.Of(source.Network).ReadValues();
        var values = new float[bytes.Length / 4];
        Buffer.BlockCopy(bytes, 0, values, 0, bytes.Length);
        using var named = DiffusionModel.FromWeights(Small, weights, CPU);
        using var flat = DiffusionModel.FromVector(Small, values, CPU);
        Assert.Equal(ParameterVector.Of(named.Network).ReadValues(), ParameterVector.Of(flat.Network).ReadValues());
        Assert.False(flat.Network.training);
        var request = new SamplingRequest(5, SamplingMethod.Ddim, 4, 0.5, Seed: 9);
        using var a = named.Sample(request);
        using var b = flat.Sample(request);
        Assert.Equal(a.Samples.data<float>().ToArray(), b.Samples.data<float>().ToArray());
        Assert.Throws<ArgumentException>(() => DiffusionModel.FromVector(Small, values[1..], CPU));
    }

    [Fact]
    public void RecipeValidateIncludesTheNetworkChecks()
    {
        // Four U-Net stages halve 28 three times: caught by Validate, not first when the network is built.
        var e = Assert.Throws<ArgumentException>(() => (Recipes.MnistSmall with { ChannelMultipliers = [1, 2, 2, 2] }).Validate());
        Assert.Contains("channel-multipliers", e.Message);
        e = Assert.Throws<ArgumentException>(() => (Recipes.MnistSmall with { BaseChannels = 1, GroupNormGroups = 1 }).Validate());
        Assert.Contains("base-channels", e.Message);
    }
}
