using static TorchSharp.torch;

namespace DistDiffusion.Model.Diffusion;

/// <summary>Closed-form Gaussian quantities used by the variational bound (all in nats, elementwise).</summary>
public static class GaussianMath
{
    /// <summary>KL(N(m1, e^lv1) || N(m2, e^lv2)), elementwise, broadcasting.</summary>
    public static Tensor NormalKl(Tensor mean1, Tensor logVar1, Tensor mean2, Tensor logVar2) =>
        0.5f * (-1.0f + logVar2 - logVar1 + (logVar1 - logVar2).exp() + (mean1 - mean2).square() * (-logVar2).exp());

    /// <summary>log N(x; mean, e^logVar), elementwise.</summary>
    public static Tensor GaussianLogDensity(Tensor x, Tensor mean, Tensor logVar) =>
        -0.5f * (Math.Log(2 * Math.PI) + logVar + (x - mean).square() * (-logVar).exp());

    /// <summary>Standard normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2.</summary>
    public static Tensor StandardNormalCdf(Tensor x) => 0.5f * (1.0f + (x * (1.0 / Math.Sqrt(2.0))).erf());

    /// <summary>
    /// log-likelihood of 8-bit data x in [-1, 1] under N(mean, e^(2 logScale)) discretized into 256 bins of
    /// width 2/255, with the edge bins extended to -inf and +inf (Ho et al. eq. 13). Elementwise.
    /// </summary>
    public static Tensor DiscretizedGaussianLogLikelihood(Tensor x, Tensor mean, Tensor logScale)
    {
        var centered = x - mean;
        var invStd = (-logScale).exp();
        var cdfPlus = StandardNormalCdf(invStd * (centered + 1.0f / 255.0f));
        var cdfMin = StandardNormalCdf(invStd * (centered - 1.0f / 255.0f));
        var logCdfPlus = cdfPlus.clamp(min: 1e-12).log();
        var logOneMinusCdfMin = (1.0f - cdfMin).clamp(min: 1e-12).log();
        var logDelta = (cdfPlus - cdfMin).clamp(min: 1e-12).log();
        return where(x < -0.999, logCdfPlus, where(x > 0.999, logOneMinusCdfMin, logDelta));
    }
}
