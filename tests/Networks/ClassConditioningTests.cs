using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Networks;
using DistDiffusion.Model.Sampling;
using DistDiffusion.Model.Training;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Networks;

/// <summary>
/// Class conditioning (recipe field classes) and classifier-free guidance: the label embedding changes the output, the
/// "no label" token is a label like the others, every misuse is refused naming the value, an unconditional network is
/// exactly what it was before conditioning existed, and guidance is eq. 6 of Ho &amp; Salimans computed in one batched pass.
/// </summary>
public class ClassConditioningTests
{
    private static readonly long[] Shape = [1, 8, 8];

    private static DenoiserNetwork Net(int classes, UNetLayout layout = UNetLayout.Annotated, bool learnedVariance = false)
    {
        var recipe = TestNetworks.UNet(layout, [1, 2], learnedVariance: learnedVariance, attention: [8, 4]);
        return NetworkFactory.Create((recipe with { Classes = classes }).ToNetworkOptions(), Shape);
    }

    private static DenoiserNetwork Seeded(int classes, long seed, UNetLayout layout = UNetLayout.Annotated, bool learnedVariance = false)
    {
        lock (DistDiffusion.Model.Randomness.GlobalGeneratorLock)
        {
            manual_seed(seed);
            var net = Net(classes, layout, learnedVariance);
            net.eval();
            return net;
        }
    }

    private static Tensor Forward(DenoiserNetwork net, Tensor x, Tensor t, long[]? labels)
    {
        net.SetClassLabels(labels);
        try { return net.forward(x, t); }
        finally { net.SetClassLabels(null); }
    }

    [Theory]
    [InlineData(UNetLayout.Annotated)]
    [InlineData(UNetLayout.Ho2020)]
    public void TheLabelChangesTheOutputAndTheNoLabelTokenIsALabel(UNetLayout layout)
    {
        using var net = Seeded(3, 5, layout);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var (x, t) = TestNetworks.Inputs(4, Shape);
        var a = Forward(net, x, t, [0, 0, 0, 0]);
        var b = Forward(net, x, t, [1, 1, 1, 1]);
        var none = Forward(net, x, t, [3, 3, 3, 3]);
        Assert.Equal(3, net.NullLabel);
        Assert.False(a.allclose(b), "labels 0 and 1 gave the same output");
        Assert.False(a.allclose(none), "label 0 and no label gave the same output");
        // A row's output depends on its own label only.
        var mixed = Forward(net, x, t, [0, 1, 3, 0]);
        Assert.True(mixed[0].allclose(a[0], 1e-5, 1e-6) && mixed[1].allclose(b[1], 1e-5, 1e-6) && mixed[2].allclose(none[2], 1e-5, 1e-6));
    }

    [Fact]
    public void MisusedLabelsAreRefusedNamingTheValue()
    {
        using var conditional = Seeded(3, 5);
        using var unconditional = Seeded(0, 5);
        using var scope = NewDisposeScope();
        var (x, t) = TestNetworks.Inputs(2, Shape);
        Assert.Contains("call SetClassLabels", Assert.Throws<InvalidOperationException>(() => conditional.forward(x, t)).Message);
        Assert.Contains("class label 4: expected 0..2, or 3 for no label", Assert.Throws<InvalidOperationException>(() => Forward(conditional, x, t, [0, 4])).Message);
        Assert.Contains("class label -1", Assert.Throws<InvalidOperationException>(() => Forward(conditional, x, t, [-1, 0])).Message);
        Assert.Contains("3 class labels set but the batch has 2 rows", Assert.Throws<InvalidOperationException>(() => Forward(conditional, x, t, [0, 1, 2])).Message);
        Assert.Contains("unconditional", Assert.Throws<InvalidOperationException>(() => Forward(unconditional, x, t, [0, 0])).Message);
        // The recipe refuses conditioning where it cannot work.
        Assert.Contains("'classes'", Assert.Throws<ArgumentException>(() => (Recipes.SwissRoll with { Classes = 2 }).Validate()).Message);
        Assert.Contains("'guidance'", Assert.Throws<ArgumentException>(() => (Recipes.MnistCpu with { Guidance = 2 }).Validate()).Message);
        Assert.Contains("'label-dropout'", Assert.Throws<ArgumentException>(() => (Recipes.MnistCpuGuided with { LabelDropout = 0 }).Validate()).Message);
        Assert.Contains("'classes'", Assert.Throws<ArgumentException>(() => Recipes.MnistCpu.With("classes", "-1").Validate()).Message);
    }

    [Fact]
    public void AnUnconditionalNetworkIsUnchangedAndAConditionalOneOnlyAddsTheEmbedding()
    {
        using var plain = Seeded(0, 11);
        using var conditional = Seeded(10, 11);
        var p = plain.named_parameters().ToDictionary(e => e.name, e => e.parameter);
        var c = conditional.named_parameters().ToDictionary(e => e.name, e => e.parameter);
        Assert.DoesNotContain(p.Keys, k => k.Contains("class_emb", StringComparison.Ordinal));
        Assert.Equal(["class_emb.weight"], c.Keys.Except(p.Keys).ToArray());
        Assert.Equal([11L, 32L], c["class_emb.weight"].shape);   // 10 classes + no label, 4 x base-channels 8
        foreach (var (name, value) in p)
            Assert.True(value.eq(c[name]).all().item<bool>(), $"{name}: the conditional network's initial value differs (the embedding must be created last)");
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void GuidanceIsTheUnconditionalOutputPlusSTimesTheDifferenceInOnePass(bool learnedVariance)
    {
        using var net = Seeded(3, 7, learnedVariance: learnedVariance);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var (x, t) = TestNetworks.Inputs(3, Shape, seed: 4);
        long[] labels = [2, 0, 1];
        var conditional = Forward(net, x, t, labels);
        var unconditional = Forward(net, x, t, [3, 3, 3]);
        // s = 1 and s = 0 are one pass of the conditional / unconditional model: exactly their outputs.
        Assert.True(ClassifierFreeGuidance.Output(net, x, t, labels, 1).eq(conditional).all().item<bool>());
        Assert.True(ClassifierFreeGuidance.Output(net, x, t, labels, 0).eq(unconditional).all().item<bool>());
        var guided = ClassifierFreeGuidance.Output(net, x, t, labels, 3);
        var c = x.shape[1];
        var expected = unconditional.narrow(1, 0, c) + 3 * (conditional.narrow(1, 0, c) - unconditional.narrow(1, 0, c));
        Assert.Equal(conditional.shape, guided.shape);
        Assert.True(guided.narrow(1, 0, c).allclose(expected, 1e-4, 1e-5), "guided prediction is not out_u + s (out_c - out_u)");
        if (learnedVariance)
            Assert.True(guided.narrow(1, c, c).allclose(conditional.narrow(1, c, c), 1e-5, 1e-6), "the variance half is not the conditional model's");
        // The network's label state is cleared afterwards.
        Assert.Throws<InvalidOperationException>(() => net.forward(x, t));
    }

    [Fact]
    public void SampleIsClassesInTurnByIndexAndRequestsAreChecked()
    {
        Assert.Equal([8L, 9, 0, 1], ClassifierFreeGuidance.Labels(ClassGuidance.Default, 10, 18, 4));
        Assert.Equal([7L, 7, 7], ClassifierFreeGuidance.Labels(new ClassGuidance(Class: 7), 10, 18, 3));
        Assert.Null(ClassGuidance.Default.Problem(0));
        Assert.Null(new ClassGuidance(Guidance: 1).Problem(0));
        Assert.Contains("class = 3: this model is unconditional", new ClassGuidance(Class: 3).Problem(0));
        Assert.Contains("guidance = 2: this model is unconditional", new ClassGuidance(Guidance: 2).Problem(0));
        Assert.Contains("class = 10: expected 0..9", new ClassGuidance(Class: 10).Problem(10));
        Assert.Contains("guidance = -1: expected a finite value >= 0", new ClassGuidance(Guidance: -1).Problem(10));
        Assert.Contains("guidance = NaN", new ClassGuidance(Guidance: double.NaN).Problem(10));
        Assert.Throws<ArgumentException>(() => new SamplingRequest(2, SamplingMethod.Ddpm, 0, 0, 1, Conditioning: new ClassGuidance(Class: 1)).Validate(10, classes: 0));
    }

    [Fact]
    public void LabelDropoutDropsItsShareBySampleKeyAndTheLossNeedsLabels()
    {
        using var net = Seeded(3, 9);
        net.train();
        using var schedule = NoiseSchedule.Create(BetaSchedule.Linear, TestNetworks.Timesteps);
        var diffusion = new GaussianDiffusion(schedule, PredictionType.Epsilon, VarianceType.FixedLarge);
        var step = new TrainingStep(diffusion, 3, randomFlip: false, labelDropout: 0.1);
        var keys = Enumerable.Range(0, 20_000).Select(i => (ulong)i * 0x9E3779B97F4A7C15UL).ToArray();
        var drops = step.Draw(keys).DropLabels;
        Assert.InRange(drops.Count(d => d) / (double)drops.Length, 0.09, 0.11);
        Assert.Equal(drops, step.Draw(keys).DropLabels);
        // Other draws are the unconditional step's: conditioning adds a stream position, it moves none.
        var plainDraws = new TrainingStep(diffusion, 3, randomFlip: false).Draw(keys.AsSpan(0, 50));
        var draws = step.Draw(keys.AsSpan(0, 50));
        Assert.Equal(plainDraws.Timesteps, draws.Timesteps);
        Assert.Equal(plainDraws.NoiseKeys, draws.NoiseKeys);
        Assert.All(plainDraws.DropLabels, d => Assert.False(d));

        using var scope = NewDisposeScope();
        var (x, _) = TestNetworks.Inputs(2, Shape);
        Assert.Contains("no labels", Assert.Throws<ArgumentException>(() => step.Loss(net, x, keys.AsSpan(0, 2), 2)).Message);
        Assert.Contains("class label 3 of sample 1: expected 0..2", Assert.Throws<ArgumentException>(() => step.Loss(net, x, keys.AsSpan(0, 2), 2, [0, 3])).Message);
        step.Loss(net, x, keys.AsSpan(0, 2), 2, [0, 2]).backward();
        Assert.NotNull(net.named_parameters().Single(p => p.name == "class_emb.weight").parameter.grad);
    }
}
