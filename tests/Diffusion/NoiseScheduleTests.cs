using DistDiffusion.Model.Diffusion;

namespace DistDiffusion.Tests.Diffusion;

public class NoiseScheduleTests
{
    [Fact]
    public void LinearScheduleMatchesHoEtAlGoldenValues()
    {
        using var s = NoiseSchedule.Create(BetaSchedule.Linear, 1000);
        Assert.Equal(1e-4, s.Betas[0], 12);
        Assert.Equal(0.02, s.Betas[999], 12);
        Assert.Equal(1e-4 + (0.02 - 1e-4) * 500 / 999, s.Betas[500], 12);
        // Known value of the DDPM CIFAR-10 schedule: alpha-bar_T = 4.0358e-5.
        Assert.Equal(4.0358e-5, s.AlphasCumprod[999], 8);
        Assert.Equal(1.0, s.AlphasCumprodPrev[0]);
        Assert.Equal(s.AlphasCumprod[499], s.AlphasCumprodPrev[500]);
    }

    [Fact]
    public void SeedRecipeScheduleLeavesAlphaBarNearPointSix()
    {
        // swissroll-ddpm: T = 50, beta 1e-4..0.02 -> alpha-bar_T ~ 0.6: x_T is far from pure noise (README says so).
        using var s = NoiseSchedule.Create(BetaSchedule.Linear, 50, 1e-4, 0.02);
        var expected = 1.0;
        for (var i = 0; i < 50; i++) expected *= 1 - (1e-4 + (0.02 - 1e-4) * i / 49);
        Assert.Equal(expected, s.AlphasCumprod[49], 14);
        Assert.InRange(s.AlphasCumprod[49], 0.59, 0.61);
    }

    [Fact]
    public void CosineScheduleFollowsNicholDhariwalClosedForm()
    {
        const int T = 1000;
        using var s = NoiseSchedule.Create(BetaSchedule.Cosine, T);
        static double F(double u) => Math.Pow(Math.Cos((u + 0.008) / 1.008 * Math.PI / 2), 2);
        foreach (var i in new[] { 0, 1, 10, 100, 500, 900 })
            Assert.Equal(F((i + 1.0) / T) / F(0), s.AlphasCumprod[i], 9);
        Assert.Equal(0.999, s.Betas[T - 1], 12); // clipped at the end
        Assert.All(s.Betas, b => Assert.InRange(b, 0.0, 0.999));
    }

    [Fact]
    public void QuadraticAndSigmoidSchedulesHitTheirEndpointsAndIncrease()
    {
        using var q = NoiseSchedule.Create(BetaSchedule.Quadratic, 100, 1e-4, 0.02);
        Assert.Equal(1e-4, q.Betas[0], 12);
        Assert.Equal(0.02, q.Betas[99], 12);
        Assert.Equal(Math.Pow(Math.Sqrt(1e-4) + (Math.Sqrt(0.02) - Math.Sqrt(1e-4)) * 50 / 99, 2), q.Betas[50], 12);
        using var g = NoiseSchedule.Create(BetaSchedule.Sigmoid, 100, 1e-4, 0.02);
        Assert.Equal(1e-4 + (0.02 - 1e-4) / (1 + Math.Exp(6)), g.Betas[0], 12);
        Assert.Equal(1e-4 + (0.02 - 1e-4) / (1 + Math.Exp(-6)), g.Betas[99], 12);
        for (var i = 1; i < 100; i++)
        {
            Assert.True(q.Betas[i] > q.Betas[i - 1]);
            Assert.True(g.Betas[i] > g.Betas[i - 1]);
        }
    }

    [Fact]
    public void PosteriorCoefficientsMatchEquationSeven()
    {
        using var s = NoiseSchedule.Create(BetaSchedule.Linear, 10, 1e-3, 0.2);
        for (var i = 0; i < 10; i++)
        {
            var abar = s.AlphasCumprod[i];
            var abarPrev = i == 0 ? 1.0 : s.AlphasCumprod[i - 1];
            Assert.Equal(s.Betas[i] * (1 - abarPrev) / (1 - abar), s.PosteriorVariance[i], 14);
            Assert.Equal(s.Betas[i] * Math.Sqrt(abarPrev) / (1 - abar), s.PosteriorMeanCoef1[i], 14);
            Assert.Equal((1 - abarPrev) * Math.Sqrt(1 - s.Betas[i]) / (1 - abar), s.PosteriorMeanCoef2[i], 14);
        }
        Assert.Equal(0.0, s.PosteriorVariance[0]);
        Assert.Equal(Math.Log(s.PosteriorVariance[1]), s.PosteriorLogVarianceClipped[0], 14);
        Assert.Equal(Math.Log(s.PosteriorVariance[5]), s.PosteriorLogVarianceClipped[5], 14);
    }

    [Fact]
    public void FloatBuffersAreBuiltOncePerDeviceAndMatchTheDoubles()
    {
        using var s = NoiseSchedule.Create(BetaSchedule.Linear, 1000);
        var a = s.On(TorchSharp.torch.CPU);
        var b = s.On(TorchSharp.torch.CPU);
        Assert.Same(a, b);
        Assert.Equal(TorchSharp.torch.ScalarType.Float32, a.AlphasCumprod.dtype);
        Assert.Equal((float)s.AlphasCumprod[123], a.AlphasCumprod[123].item<float>());
        Assert.Equal((float)s.SqrtRecipM1AlphasCumprod[777], a.SqrtRecipM1AlphasCumprod[777].item<float>());
    }

    [Theory]
    [InlineData(0, 1e-4, 0.02)]
    [InlineData(10, 0.0, 0.02)]
    [InlineData(10, 0.03, 0.02)]
    [InlineData(10, 1e-4, 1.0)]
    public void BadArgumentsAreRejectedWithTheValue(int T, double start, double end)
    {
        var e = Assert.Throws<ArgumentException>(() => NoiseSchedule.Create(BetaSchedule.Linear, T, start, end));
        Assert.True(e.Message.Contains(T.ToString(System.Globalization.CultureInfo.InvariantCulture), StringComparison.Ordinal)
            || e.Message.Contains("beta", StringComparison.Ordinal), e.Message);
    }
}
