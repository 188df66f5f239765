using DistDiffusion.Model.Diffusion;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Diffusion;

public class GaussianDiffusionTests
{
    private static Tensor Randn(long seed, params long[] shape) =>
        CounterRng.NormalRows([(ulong)seed], shape, CPU).squeeze(0);

    private static Tensor Ts(params long[] t) => tensor(t, ScalarType.Int64);

    [Fact]
    public void QSampleHasTheClosedFormMeanAndVariance()
    {
        using var scope = NewDisposeScope();
        using var s = NoiseSchedule.Create(BetaSchedule.Linear, 1000);
        var d = new GaussianDiffusion(s, PredictionType.Epsilon, VarianceType.FixedLarge);
        const int n = 20000;
        var x0 = full(new long[] { n, 2 }, 0.5f);
        var t = full(new long[] { n }, 300L, ScalarType.Int64);
        var eps = Randn(7, n, 2);
        var xt = d.QSample(x0, t, eps);
        var mean = xt.mean().item<float>();
        var variance = xt.var().item<float>();
        // Standard errors with 40,000 values: mean ~0.004, variance ~0.004; allow 4 of them.
        Assert.InRange(mean, Math.Sqrt(s.AlphasCumprod[300]) * 0.5 - 0.016, Math.Sqrt(s.AlphasCumprod[300]) * 0.5 + 0.016);
        Assert.InRange(variance, 1 - s.AlphasCumprod[300] - 0.016, 1 - s.AlphasCumprod[300] + 0.016);
        // And exactly the formula for the given eps.
        var expected = (float)Math.Sqrt(s.AlphasCumprod[300]) * x0 + (float)Math.Sqrt(1 - s.AlphasCumprod[300]) * eps;
        Assert.True(xt.allclose(expected, rtol: 1e-5, atol: 1e-6));
    }

    [Fact]
    public void PerfectNoisePredictionGivesTheExactPosteriorMean()
    {
        using var scope = NewDisposeScope();
        using var s = NoiseSchedule.Create(BetaSchedule.Linear, 100, 1e-4, 0.05);
        var d = new GaussianDiffusion(s, PredictionType.Epsilon, VarianceType.FixedSmall);
        var x0 = Randn(1, 6, 1, 4, 4).clamp(-1, 1);
        var eps = Randn(2, 6, 1, 4, 4);
        var t = Ts(0, 1, 17, 50, 98, 99);
        var xt = d.QSample(x0, t, eps);
        var p = d.PMeanVariance(eps, xt, t, clipDenoised: false);
        var (trueMean, trueLogVar) = d.QPosteriorMeanVariance(x0, xt, t);
        Assert.True(p.Mean.allclose(trueMean, rtol: 1e-4, atol: 1e-4), "mean differs");
        Assert.True(p.PredX0.allclose(x0, rtol: 1e-3, atol: 1e-3), "x0 differs");
        Assert.True(p.LogVariance.allclose(trueLogVar), "log variance differs");
        // At t = 1 the posterior mean is x_0 itself.
        Assert.True(trueMean[0].allclose(x0[0], atol: 1e-5));
        // And the bound terms vanish for t > 1 (KL of identical Gaussians).
        var vb = d.VbTerms(eps, x0, xt, t, clipDenoised: false);
        Assert.All(vb[TensorIndex.Slice(1)].data<float>().ToArray(), v => Assert.InRange(v, -1e-3f, 1e-3f));
    }

    [Fact]
    public void EpsilonX0AndVParameterizationsAreEquivalent()
    {
        using var scope = NewDisposeScope();
        using var s = NoiseSchedule.Create(BetaSchedule.Cosine, 200);
        var x0 = Randn(3, 5, 2);
        var eps = Randn(4, 5, 2);
        var t = Ts(0, 3, 60, 150, 199);
        var eD = new GaussianDiffusion(s, PredictionType.Epsilon, VarianceType.FixedLarge);
        var xD = new GaussianDiffusion(s, PredictionType.X0, VarianceType.FixedLarge);
        var vD = new GaussianDiffusion(s, PredictionType.V, VarianceType.FixedLarge);
        var xt = eD.QSample(x0, t, eps);
        var v = eD.Velocity(x0, t, eps);
        var pe = eD.PMeanVariance(eps, xt, t, false);
        var px = xD.PMeanVariance(x0, xt, t, false);
        var pv = vD.PMeanVariance(v, xt, t, false);
        Assert.True(pe.Mean.allclose(px.Mean, rtol: 1e-3, atol: 1e-3));
        Assert.True(pv.Mean.allclose(px.Mean, rtol: 1e-4, atol: 1e-4));
        Assert.True(pv.PredEps.allclose(eps, rtol: 1e-3, atol: 1e-3));
        // Targets are what each parameterization regresses to, and the losses of perfect predictions vanish.
        Assert.True(vD.Target(x0, t, eps).allclose(v));
        Assert.Equal(0f, vD.TrainingLosses(v, x0, xt, t, eps).sum().item<float>(), 6);
        Assert.Equal(0f, xD.TrainingLosses(x0, x0, xt, t, eps).sum().item<float>(), 6);
    }

    [Fact]
    public void LossTypesAndReductionsFollowTheirDefinitions()
    {
        using var scope = NewDisposeScope();
        using var s = NoiseSchedule.Create(BetaSchedule.Linear, 10);
        var x0 = zeros(2, 3);
        var eps = tensor(new float[] { 0.5f, -2f, 1f, 0f, 3f, -0.25f }, new long[] { 2, 3 });
        var t = Ts(1, 2);
        var output = zeros(2, 3);
        float[] Loss(LossType l, LossReduction r) =>
            new GaussianDiffusion(s, PredictionType.Epsilon, VarianceType.FixedLarge, l, r).TrainingLosses(output, x0, x0, t, eps).data<float>().ToArray();
        Assert.Equal(new[] { (0.25f + 4f + 1f) / 3, (9f + 0.0625f) / 3 }, Loss(LossType.L2, LossReduction.Mean));
        Assert.Equal(new[] { 0.25f + 4f + 1f, 9f + 0.0625f }, Loss(LossType.L2, LossReduction.Sum));
        Assert.Equal(new[] { 3.5f / 3, 3.25f / 3 }, Loss(LossType.L1, LossReduction.Mean));
        // Huber (delta 1): 0.5 d^2 inside |d| < 1, |d| - 0.5 outside.
        Assert.Equal(new[] { 0.125f + 1.5f + 0.5f, 2.5f + 0.03125f }, Loss(LossType.Huber, LossReduction.Sum));
    }

    [Fact]
    public void MinSnrWeightsFollowHang2023()
    {
        using var scope = NewDisposeScope();
        using var s = NoiseSchedule.Create(BetaSchedule.Linear, 1000);
        // Golden values (linear 1e-4 .. 0.02, T = 1000): SNR at index 0 = 0.9999 / 0.0001 = 9999, so min(SNR, 5) / SNR = 5 / 9999.
        Assert.Equal(9999.0, s.SignalToNoise[0], 6);
        int[] idx = [0, 10, 100, 300, 999];
        var t = tensor(idx.Select(i => (long)i).ToArray(), ScalarType.Int64);
        foreach (var (prediction, expected) in new (PredictionType, Func<double, double>)[]
                 {
                     (PredictionType.Epsilon, snr => Math.Min(snr, 5) / snr),
                     (PredictionType.V, snr => Math.Min(snr, 5) / (snr + 1)),
                     (PredictionType.X0, snr => Math.Min(snr, 5)),
                 })
        {
            var d = new GaussianDiffusion(s, prediction, VarianceType.FixedLarge, weighting: LossWeighting.MinSnr, minSnrGamma: 5);
            var w = d.MinSnrWeights(t).data<float>().ToArray();
            for (var k = 0; k < idx.Length; k++)
                Assert.Equal(expected(s.SignalToNoise[idx[k]]), w[k], 1e-4 * Math.Max(1.0, expected(s.SignalToNoise[idx[k]])));
        }
        // Where SNR < gamma (high noise) an epsilon loss is unchanged; the weighted loss is the uniform one times the weight.
        var eps = Randn(7, 5, 3);
        var x0 = Randn(8, 5, 3);
        var output = zeros(5, 3);
        var uniform = new GaussianDiffusion(s, PredictionType.Epsilon, VarianceType.FixedLarge).TrainingLosses(output, x0, x0, t, eps);
        var minSnr = new GaussianDiffusion(s, PredictionType.Epsilon, VarianceType.FixedLarge, weighting: LossWeighting.MinSnr, minSnrGamma: 5);
        var weighted = minSnr.TrainingLosses(output, x0, x0, t, eps);
        Assert.True(weighted.allclose(uniform * minSnr.MinSnrWeights(t), rtol: 1e-6, atol: 0));
        Assert.Equal(uniform[4].item<float>(), weighted[4].item<float>());
        Assert.Throws<ArgumentException>(() => new GaussianDiffusion(s, PredictionType.Epsilon, VarianceType.FixedLarge, weighting: LossWeighting.MinSnr, minSnrGamma: 0));
    }

    [Fact]
    public void LearnedRangeVarianceInterpolatesBetweenBetaTildeAndBeta()
    {
        using var scope = NewDisposeScope();
        using var s = NoiseSchedule.Create(BetaSchedule.Linear, 40, 1e-4, 0.1);
        var d = new GaussianDiffusion(s, PredictionType.Mean, VarianceType.LearnedRange, LossType.Kl);
        var xt = zeros(3, 2);
        var t = Ts(5, 5, 5);
        var v = tensor(new float[] { -1, -1, 1, 1, 0, 0 }, new long[] { 3, 2 });
        var lv = d.LogVariance(v, xt, t);
        Assert.Equal(Math.Log(s.PosteriorVariance[5]), lv[0, 0].item<float>(), 4);
        Assert.Equal(Math.Log(s.Betas[5]), lv[1, 0].item<float>(), 4);
        Assert.Equal(0.5 * (Math.Log(s.PosteriorVariance[5]) + Math.Log(s.Betas[5])), lv[2, 1].item<float>(), 4);
    }

    [Fact]
    public void DirectMeanPredictionFollowsSohlDicksteinForm()
    {
        using var scope = NewDisposeScope();
        using var s = NoiseSchedule.Create(BetaSchedule.Linear, 40, 1e-4, 0.1);
        var d = new GaussianDiffusion(s, PredictionType.Mean, VarianceType.LearnedRange, LossType.Kl);
        var xt = Randn(9, 4, 2);
        var f = Randn(10, 4, 2);
        var t = Ts(0, 7, 20, 39);
        var output = cat([f, zeros(4, 2)], 1);
        var p = d.PMeanVariance(output, xt, t, false);
        for (var i = 0; i < 4; i++)
        {
            var ti = (int)t[i].item<long>();
            var expected = (float)Math.Sqrt(1 - s.Betas[ti]) * xt[i] + (float)Math.Sqrt(s.Betas[ti]) * f[i];
            Assert.True(p.Mean[i].allclose(expected, atol: 1e-5));
        }
        // The implied x_0 has that mean as its posterior mean.
        var (back, _) = d.QPosteriorMeanVariance(p.PredX0, xt, t);
        Assert.True(back.allclose(p.Mean, atol: 1e-4));
    }

    [Fact]
    public void DiscretizedDecoderIsAProbabilityOverThe256Levels()
    {
        using var scope = NewDisposeScope();
        var levels = linspace(-1, 1, 256);
        foreach (var (mean, logScale) in new[] { (0.1f, -3f), (-0.9f, -1f), (0.99f, -5f) })
        {
            var lp = GaussianMath.DiscretizedGaussianLogLikelihood(levels, full(256, mean), full(256, logScale));
            Assert.Equal(1.0, lp.exp().sum().item<float>(), 3);
        }
    }

    [Fact]
    public void PriorTermIsNearZeroForALongSchedule()
    {
        using var scope = NewDisposeScope();
        using var s = NoiseSchedule.Create(BetaSchedule.Linear, 1000);
        var d = new GaussianDiffusion(s, PredictionType.Epsilon, VarianceType.FixedLarge, discreteData: true);
        var prior = d.PriorBpd(Randn(5, 2, 1, 4, 4).clamp(-1, 1));
        Assert.All(prior.data<float>().ToArray(), p => Assert.InRange(p, 0f, 1e-3f));
        using var shortS = NoiseSchedule.Create(BetaSchedule.Linear, 50, 1e-4, 0.02);
        var shortD = new GaussianDiffusion(shortS, PredictionType.Epsilon, VarianceType.FixedLarge, discreteData: true);
        Assert.True(shortD.PriorBpd(ones(1, 1, 4, 4)).item<float>() > 0.1f, "T = 50 with beta to 0.02 leaves x_T far from N(0, I)");
    }
}
