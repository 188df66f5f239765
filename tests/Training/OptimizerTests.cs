using DistDiffusion.Model.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Training;

public class OptimizerTests
{
    [Fact]
    public void AdamMatchesTorchAdamStepForStep()
    {
        using var scope = NewDisposeScope();
        var recipe = new Recipe { LearningRate = 0.01, AdamBeta1 = 0.9, AdamBeta2 = 0.99, AdamEpsilon = 1e-8 };
        var a = nn.Linear(3, 2);
        var b = nn.Linear(3, 2);
        b.load_state_dict(a.state_dict());
        var ours = new AdamOptimizer(a.named_parameters().Select(p => (p.name, p.parameter)), recipe);
        var theirs = optim.Adam(b.parameters(), lr: 0.01, beta1: 0.9, beta2: 0.99, eps: 1e-8);
        var x = tensor(new float[] { 1, 2, 3, -1, 0.5f, 2 }, new long[] { 2, 3 });
        for (var step = 0; step < 5; step++)
        {
            ours.ZeroGrad();
            theirs.zero_grad();
            a.forward(x * (step + 1)).square().sum().backward();
            b.forward(x * (step + 1)).square().sum().backward();
            ours.Step();
            theirs.step();
        }
        foreach (var ((_, pa), (_, pb)) in a.named_parameters().Zip(b.named_parameters()))
            Assert.True(pa.allclose(pb, rtol: 1e-5, atol: 1e-6));
        Assert.Equal(5, ours.StepCount);
    }

    [Fact]
    public void ClippingWarmupAndNonFiniteGradients()
    {
        using var scope = NewDisposeScope();
        var lin = nn.Linear(2, 1, hasBias: false);
        var recipe = new Recipe { LearningRate = 0.1, GradClip = 1.0, WarmupSteps = 10 };
        var opt = new AdamOptimizer(lin.named_parameters().Select(p => (p.name, p.parameter)), recipe);
        Assert.Equal(0.01, opt.LearningRateAt(1), 12);
        Assert.Equal(0.1, opt.LearningRateAt(10), 12);
        Assert.Equal(0.1, opt.LearningRateAt(50), 12);
        (lin.forward(tensor(new float[] { 100, 100 }, new long[] { 1, 2 })).sum()).backward();
        Assert.True(opt.GradientNorm() > 100);
        var before = lin.weight!.clone();
        opt.Step();
        Assert.False(lin.weight!.eq(before).all().item<bool>());
        // A NaN gradient is refused and leaves the weights untouched.
        opt.ZeroGrad();
        lin.weight!.grad!.fill_(float.NaN);
        var kept = lin.weight!.clone();
        Assert.Throws<InvalidOperationException>(() => opt.Step());
        Assert.True(lin.weight!.eq(kept).all().item<bool>());
        Assert.Equal(1, opt.StepCount);
    }

    [Fact]
    public void EmaWarmsUpThenFollowsDecay()
    {
        using var scope = NewDisposeScope();
        var lin = nn.Linear(1, 1, hasBias: false);
        using (no_grad()) lin.weight!.fill_(0f);
        var ema = new ExponentialMovingAverage(lin.named_parameters().Select(p => (p.name, p.parameter)), 0.99);
        Assert.Equal(2.0 / 11.0, ema.DecayAt(1), 12);
        Assert.Equal(0.99, ema.DecayAt(100_000), 12);
        using (no_grad()) lin.weight!.fill_(1f);
        ema.Update(1);
        Assert.Equal(1 - 2.0 / 11.0, ema.Weights["weight"].item<float>(), 5);
    }
}
