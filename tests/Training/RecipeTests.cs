using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Optimization;

namespace DistDiffusion.Tests.Training;

public class RecipeTests
{
    [Fact]
    public void EveryNamedRecipeIsValidAndRoundTripsThroughJson()
    {
        foreach (var r in Recipes.All)
        {
            r.Validate();
            Assert.Equal(r, Recipe.FromJson(r.ToJson()));
            Assert.Same(r, Recipes.Get(r.Name.ToUpperInvariant()) is var g && g.Name == r.Name ? r : null);
        }
    }

    [Fact]
    public void DependentFieldsCanBeOverriddenInAnyOrder()
    {
        // Each intermediate state is invalid (kl loss needs a learned variance and vice versa): only the result is checked.
        var learned = Recipes.SwissRoll.WithOverrides(["variance=learned-range", "loss=kl", "prediction=mean"]);
        Assert.Equal(VarianceType.LearnedRange, learned.Variance);
        var narrow = Recipes.MnistSmall.WithOverrides(["base-channels=12", "group-norm-groups=4"]);
        Assert.Equal(12, narrow.BaseChannels);
    }

    [Fact]
    public void SeedRecipesKeepTheSeedValues()
    {
        Assert.Equal(50, Recipes.SwissRollDdpm.Timesteps);
        Assert.Equal(0.02, Recipes.SwissRollDdpm.BetaEnd);
        Assert.Equal(128, Recipes.SwissRollDdpm.BatchSize);
        Assert.Equal(40, Recipes.SwissRollSohl2015.Timesteps);
        Assert.Equal(LossType.Kl, Recipes.SwissRollSohl2015.Loss);
        Assert.Equal(0.1, Recipes.MnistDdpm.BetaEnd);
        Assert.Equal(128, Recipes.MnistDdpm.BaseChannels);
        Assert.Equal(LossReduction.Sum, Recipes.MnistDdpm.Reduction);
        Assert.Equal(300, Recipes.FashionMnistAnnotated.Timesteps);
        Assert.Equal(LossType.Huber, Recipes.FashionMnistAnnotated.Loss);
        Assert.Equal(1000, Recipes.Cifar10Ddpm.Timesteps);
        Assert.Equal(0.9999, Recipes.Cifar10Ddpm.EmaDecay);
        Assert.Equal(DatasetKind.SwissRoll, Recipes.SwissRoll.Dataset);
    }

    [Fact]
    public void OverridesParseEveryFieldTypeAndRejectBadInputByName()
    {
        var r = Recipes.MnistSmall.WithOverrides(["learning-rate=2e-4", "beta_schedule=cosine", "ChannelMultipliers=1,2", "random-flip=true", "timesteps=77"]);
        Assert.Equal(2e-4, r.LearningRate);
        Assert.Equal(BetaSchedule.Cosine, r.BetaSchedule);
        Assert.Equal([1, 2], r.ChannelMultipliers);
        Assert.True(r.RandomFlip);
        Assert.Equal(77, r.Timesteps);
        Assert.Contains("learnig-rate", Assert.Throws<ArgumentException>(() => Recipes.SwissRoll.With("learnig-rate", "1")).Message);
        var bad = Assert.Throws<ArgumentException>(() => Recipes.SwissRoll.With("timesteps", "many")).Message;
        Assert.Contains("many", bad);
        Assert.Contains("integer", bad);
        Assert.Contains("timesteps", Assert.Throws<ArgumentException>(() => Recipes.SwissRoll.WithOverrides(["timesteps=0"])).Message);
        Assert.Contains("group-norm-groups", Assert.Throws<ArgumentException>(() => Recipes.MnistSmall.WithOverrides(["group-norm-groups=0"])).Message);
        Assert.Contains("random-flip", Assert.Throws<ArgumentException>(() => Recipes.SwissRoll.WithOverrides(["random-flip=true"])).Message);
        Assert.Contains("key=value", Assert.Throws<ArgumentException>(() => Recipes.SwissRoll.WithOverrides(["timesteps"])).Message);
        var decayed = Recipes.MnistSmall.WithOverrides(["learning-rate-decay=cosine", "min-learning-rate=1e-4", "loss-weighting=min-snr", "min-snr-gamma=3"]);
        Assert.Equal(LearningRateDecay.Cosine, decayed.LearningRateDecay);
        Assert.Equal(LossWeighting.MinSnr, decayed.LossWeighting);
        Assert.Equal(3.0, decayed.MinSnrGamma);
        var tooLow = Assert.Throws<ArgumentException>(() => Recipes.MnistSmall.WithOverrides(["min-learning-rate=0.5"])).Message;
        Assert.Contains("min-learning-rate", tooLow);
        Assert.Contains("0.5", tooLow);
        Assert.Contains("min-snr-gamma", Assert.Throws<ArgumentException>(() => Recipes.MnistSmall.WithOverrides(["loss-weighting=min-snr", "min-snr-gamma=0"])).Message);
        Assert.Contains("loss-weighting", Assert.Throws<ArgumentException>(() =>
            Recipes.MnistSmall.WithOverrides(["loss-weighting=min-snr", "loss=kl", "variance=learned-range"])).Message);
        Assert.Contains("swissroll", Assert.Throws<ArgumentException>(() => Recipes.Get("nope")).Message);
    }
}
