using DistDiffusion.Model.Diffusion;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Diffusion;

public class SamplerTests
{
    [Fact]
    public void StridedTimestepsSpanTheWholeRange()
    {
        var ts = DdimSampler.StridedTimesteps(1000, 50);
        Assert.Equal(50, ts.Length);
        Assert.Equal(999, ts[0]);
        Assert.Equal(0, ts[^1]);
        Assert.Equal(50, ts.Distinct().Count());
        Assert.True(ts.Zip(ts.Skip(1)).All(p => p.First > p.Second));
        Assert.Equal(Enumerable.Range(0, 20).Reverse(), DdimSampler.StridedTimesteps(20, 20));
        Assert.Throws<ArgumentException>(() => DdimSampler.StridedTimesteps(20, 21));
        Assert.Throws<ArgumentException>(() => DdimSampler.StridedTimesteps(20, 0));
    }

    [Fact]
    public void DdimWithEtaOneOnAllStepsIsDdpmWithPosteriorVariance()
    {
        using var scope = NewDisposeScope();
        using var s = NoiseSchedule.Create(BetaSchedule.Linear, 30, 1e-3, 0.1);
        var d = new GaussianDiffusion(s, PredictionType.Epsilon, VarianceType.FixedSmall);
        var ddpm = new DdpmSampler(d, clipDenoised: false);
        var ddim = new DdimSampler(d, 30, eta: 1.0, clipDenoised: false);
        var x = CounterRng.NormalRows([1UL, 2UL], [3], CPU);
        var output = CounterRng.NormalRows([3UL, 4UL], [3], CPU);
        var noise = CounterRng.NormalRows([5UL, 6UL], [3], CPU);
        for (var pos = 0; pos < 30; pos++)
        {
            var a = ddpm.Step(output, pos, x, noise);
            var b = ddim.Step(output, pos, x, noise);
            Assert.True(a.allclose(b, rtol: 1e-4, atol: 1e-5), $"step {pos}: DDPM and DDIM(eta=1) differ");
        }
    }

    [Fact]
    public void DdimWithEtaZeroIgnoresNoise()
    {
        using var scope = NewDisposeScope();
        using var s = NoiseSchedule.Create(BetaSchedule.Linear, 100);
        var d = new GaussianDiffusion(s, PredictionType.Epsilon, VarianceType.FixedLarge);
        var ddim = new DdimSampler(d, 10, eta: 0, clipDenoised: true);
        var x = CounterRng.NormalRows([1UL], [4], CPU);
        var output = CounterRng.NormalRows([2UL], [4], CPU);
        for (var pos = 0; pos < 10; pos++) Assert.False(ddim.UsesNoise(pos));
        var a = ddim.Step(output, 3, x, null);
        var b = ddim.Step(output, 3, x, CounterRng.NormalRows([9UL], [4], CPU));
        Assert.True(a.eq(b).all().item<bool>());
    }

    [Fact]
    public void DdpmStepAddsNoiseScaledBySigmaExceptAtTheEnd()
    {
        using var scope = NewDisposeScope();
        using var s = NoiseSchedule.Create(BetaSchedule.Linear, 10, 1e-3, 0.1);
        var d = new GaussianDiffusion(s, PredictionType.Epsilon, VarianceType.FixedLarge);
        var ddpm = new DdpmSampler(d, false);
        var x = zeros(1, 2);
        var eps = zeros(1, 2);
        var noise = ones(1, 2);
        // Timesteps[0] = 9: mean of a zero x_t with zero eps is zero, so the step is exactly sigma_t = sqrt(beta_t).
        Assert.Equal(Math.Sqrt(s.Betas[9]), ddpm.Step(eps, 0, x, noise)[0, 0].item<float>(), 5);
        Assert.False(ddpm.UsesNoise(9));
        Assert.Equal(0f, ddpm.Step(eps, 9, x, null).abs().sum().item<float>());
    }
}
