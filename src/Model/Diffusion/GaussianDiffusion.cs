using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Diffusion;

/// <summary>p(x_{t-1} | x_t) as the network's output defines it (Ho et al. eq. 1, 11).</summary>
/// <param name="Mean">mu_theta(x_t, t), shape of x_t.</param>
/// <param name="LogVariance">log Sigma_theta(x_t, t), broadcastable to x_t ([B, 1, ...] for fixed variances, x_t's shape when learned).</param>
/// <param name="PredX0">The x_0 the output implies (clipped to [-1, 1] when asked), shape of x_t.</param>
/// <param name="PredEps">The epsilon the output implies, shape of x_t.</param>
public sealed record PMeanVarianceResult(Tensor Mean, Tensor LogVariance, Tensor PredX0, Tensor PredEps);

/// <summary>
/// The Gaussian diffusion process of Ho et al. (2020): the forward process q, its posterior, the
/// reverse process p_theta given a network output, and the per-sample training losses. It never
/// calls a network: callers pass the network's output (diffusers' scheduler/model split).
/// All tensors: [B, ...] with t a [B] int64 tensor of indices 0..T-1 (paper t = index + 1).
/// </summary>
public sealed class GaussianDiffusion
{
    public NoiseSchedule Schedule { get; }
    public PredictionType Prediction { get; }
    public VarianceType Variance { get; }
    public LossType Loss { get; }
    public LossReduction Reduction { get; }
    /// <summary>True for 8-bit image data in [-1, 1]: L_0 uses the discretized Gaussian decoder (Ho et al. eq. 13).</summary>
    public bool DiscreteData { get; }
    public LossWeighting Weighting { get; }
    /// <summary>The gamma of <see cref="LossWeighting.MinSnr"/>.</summary>
    public double MinSnrGamma { get; }

    public GaussianDiffusion(NoiseSchedule schedule, PredictionType prediction, VarianceType variance,
        LossType loss = LossType.L2, LossReduction reduction = LossReduction.Mean, bool discreteData = false,
        LossWeighting weighting = LossWeighting.Uniform, double minSnrGamma = 5.0)
    {
        if (weighting == LossWeighting.MinSnr && !(minSnrGamma > 0))
            throw new ArgumentException($"min-snr gamma {minSnrGamma}: expected a value > 0", nameof(minSnrGamma));
        if (weighting == LossWeighting.MinSnr && (loss == LossType.Kl || prediction == PredictionType.Mean))
            throw new ArgumentException($"loss weighting min-snr with loss {loss} and prediction {prediction}: expected an epsilon, x0 or v regression loss", nameof(weighting));
        Weighting = weighting;
        MinSnrGamma = minSnrGamma;
        Schedule = schedule;
        Prediction = prediction;
        Variance = variance;
        Loss = loss;
        Reduction = reduction;
        DiscreteData = discreteData;
    }

    public int T => Schedule.T;

    /// <summary>Does the network output a second, variance half along dim 1?</summary>
    public bool LearnsVariance => Variance == VarianceType.LearnedRange;

    private ScheduleBuffers B(Tensor like) => Schedule.On(like.device);

    private static Tensor Ex(Tensor coef, Tensor t, Tensor x) => ScheduleBuffers.Extract(coef, t, x);

    // ---------------- forward process ----------------

    /// <summary>q(x_t | x_0) sample, eq. 4: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. Shapes [B, ...].</summary>
    public Tensor QSample(Tensor x0, Tensor t, Tensor eps)
    {
        var b = B(x0);
        return Ex(b.SqrtAlphasCumprod, t, x0) * x0 + Ex(b.SqrtOneMinusAlphasCumprod, t, x0) * eps;
    }

    /// <summary>Mean and log-variance of q(x_t | x_0): sqrt(abar_t) x_0 and log(1 - abar_t).</summary>
    public (Tensor Mean, Tensor LogVariance) QMeanVariance(Tensor x0, Tensor t)
    {
        var b = B(x0);
        var mean = Ex(b.SqrtAlphasCumprod, t, x0) * x0;
        var logVar = (1.0f - Ex(b.AlphasCumprod, t, x0)).log();
        return (mean, logVar);
    }

    /// <summary>q(x_{t-1} | x_t, x_0) = N(mu-tilde, beta-tilde), eq. 6-7. Returns mean [B, ...] and clipped log variance [B, 1, ...].</summary>
    public (Tensor Mean, Tensor LogVariance) QPosteriorMeanVariance(Tensor x0, Tensor xt, Tensor t)
    {
        var b = B(xt);
        var mean = Ex(b.PosteriorMeanCoef1, t, xt) * x0 + Ex(b.PosteriorMeanCoef2, t, xt) * xt;
        return (mean, Ex(b.PosteriorLogVarianceClipped, t, xt));
    }

    /// <summary>x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps (eq. 4 solved for x_0).</summary>
    public Tensor PredictX0FromEps(Tensor xt, Tensor t, Tensor eps)
    {
        var b = B(xt);
        return Ex(b.SqrtRecipAlphasCumprod, t, xt) * xt - Ex(b.SqrtRecipM1AlphasCumprod, t, xt) * eps;
    }

    /// <summary>eps = (sqrt(1/abar_t) x_t - x_0) / sqrt(1/abar_t - 1).</summary>
    public Tensor PredictEpsFromX0(Tensor xt, Tensor t, Tensor x0)
    {
        var b = B(xt);
        return (Ex(b.SqrtRecipAlphasCumprod, t, xt) * xt - x0) / Ex(b.SqrtRecipM1AlphasCumprod, t, xt);
    }

    /// <summary>v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans &amp; Ho 2022, eq. in sec. 4).</summary>
    public Tensor Velocity(Tensor x0, Tensor t, Tensor eps)
    {
        var b = B(x0);
        return Ex(b.SqrtAlphasCumprod, t, x0) * eps - Ex(b.SqrtOneMinusAlphasCumprod, t, x0) * x0;
    }

    /// <summary>x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v.</summary>
    public Tensor PredictX0FromV(Tensor xt, Tensor t, Tensor v)
    {
        var b = B(xt);
        return Ex(b.SqrtAlphasCumprod, t, xt) * xt - Ex(b.SqrtOneMinusAlphasCumprod, t, xt) * v;
    }

    // ---------------- reverse process ----------------

    /// <summary>Splits a network output [B, 2C, ...] into (prediction [B, C, ...], variance output [B, C, ...]); the variance half is null for fixed variances.</summary>
    public (Tensor Prediction, Tensor? VarianceOutput) SplitOutput(Tensor modelOutput)
    {
        if (!LearnsVariance) return (modelOutput, null);
        var halves = modelOutput.chunk(2, 1);
        return (halves[0], halves[1]);
    }

    /// <summary>log Sigma_theta: fixed (beta or beta-tilde) or learned-range interpolation (Nichol &amp; Dhariwal eq. 15).</summary>
    public Tensor LogVariance(Tensor? varianceOutput, Tensor xt, Tensor t)
    {
        var b = B(xt);
        switch (Variance)
        {
            case VarianceType.FixedLarge:
                return Ex(b.FixedLargeLogVariance, t, xt);
            case VarianceType.FixedSmall:
                return Ex(b.PosteriorLogVarianceClipped, t, xt);
            case VarianceType.LearnedRange:
                {
                    var v = varianceOutput ?? throw new ArgumentException("learned variance needs the network's variance output half");
                    var frac = (v + 1.0f) * 0.5f;
                    return frac * Ex(b.LogBetas, t, xt) + (1.0f - frac) * Ex(b.PosteriorLogVarianceClipped, t, xt);
                }
            default:
                throw new ArgumentException($"variance type {Variance}: not supported");
        }
    }

    /// <summary>
    /// p_theta(x_{t-1} | x_t) from the network output (eq. 1, 11): the mean comes from the predicted x_0
    /// through the posterior mean (eq. 7), or directly for <see cref="PredictionType.Mean"/>.
    /// modelOutput [B, C(*2), ...], xt [B, C, ...], t [B].
    /// </summary>
    public PMeanVarianceResult PMeanVariance(Tensor modelOutput, Tensor xt, Tensor t, bool clipDenoised)
    {
        var (pred, varOut) = SplitOutput(modelOutput);
        var logVar = LogVariance(varOut, xt, t);
        if (Prediction == PredictionType.Mean)
        {
            // Sohl-Dickstein et al. 2015: mu = sqrt(1 - beta_t) x_t + sqrt(beta_t) f_mu(x_t, t).
            var b = B(xt);
            var mean = Ex(b.SqrtOneMinusBetas, t, xt) * xt + Ex(b.SqrtBetas, t, xt) * pred;
            // The x_0 with posterior mean mu: invert eq. 7 (coef1 > 0 for every t).
            var x0FromMean = (mean - Ex(b.PosteriorMeanCoef2, t, xt) * xt) / Ex(b.PosteriorMeanCoef1, t, xt);
            if (!clipDenoised)
                return new PMeanVarianceResult(mean, logVar, x0FromMean, PredictEpsFromX0(xt, t, x0FromMean));
            var clippedX0 = x0FromMean.clamp(-1.0, 1.0);
            var (clippedMean, _) = QPosteriorMeanVariance(clippedX0, xt, t);
            return new PMeanVarianceResult(clippedMean, logVar, clippedX0, PredictEpsFromX0(xt, t, clippedX0));
        }
        var x0 = Prediction switch
        {
            PredictionType.Epsilon => PredictX0FromEps(xt, t, pred),
            PredictionType.X0 => pred,
            PredictionType.V => PredictX0FromV(xt, t, pred),
            _ => throw new ArgumentException($"prediction type {Prediction}: not supported"),
        };
        if (clipDenoised) x0 = x0.clamp(-1.0, 1.0);
        var eps = Prediction == PredictionType.Epsilon && !clipDenoised ? pred : PredictEpsFromX0(xt, t, x0);
        var (postMean, _) = QPosteriorMeanVariance(x0, xt, t);
        return new PMeanVarianceResult(postMean, logVar, x0, eps);
    }

    // ---------------- losses ----------------

    /// <summary>The regression target for the network's prediction half: eps, x_0 or v.</summary>
    public Tensor Target(Tensor x0, Tensor t, Tensor eps) => Prediction switch
    {
        PredictionType.Epsilon => eps,
        PredictionType.X0 => x0,
        PredictionType.V => Velocity(x0, t, eps),
        _ => throw new InvalidOperationException($"prediction type {Prediction} has no regression target; use loss kl"),
    };

    /// <summary>
    /// Per-sample training loss [B] for x_t = QSample(x0, t, eps): L2 (L_simple, eq. 14, for epsilon), L1 or
    /// Huber on the target, or the bound term L_{t-1} (eq. 5) for <see cref="LossType.Kl"/>.
    /// Reduced over each sample's elements by <see cref="Reduction"/> (mean, or sum).
    /// </summary>
    public Tensor TrainingLosses(Tensor modelOutput, Tensor x0, Tensor xt, Tensor t, Tensor eps)
    {
        if (Loss == LossType.Kl)
            return VbTerms(modelOutput, x0, xt, t, clipDenoised: false, reduceMean: Reduction == LossReduction.Mean);
        var (pred, _) = SplitOutput(modelOutput);
        var diff = pred - Target(x0, t, eps);
        var elementwise = Loss switch
        {
            LossType.L2 => diff.square(),
            LossType.L1 => diff.abs(),
            // Huber / smooth L1 with delta = 1.
            LossType.Huber => where(diff.abs() < 1.0, 0.5f * diff.square(), diff.abs() - 0.5f),
            _ => throw new InvalidOperationException($"loss {Loss}: not supported"),
        };
        var perSample = ReduceSample(elementwise, Reduction == LossReduction.Mean);
        return Weighting == LossWeighting.MinSnr ? perSample * MinSnrWeights(t) : perSample;
    }

    /// <summary>
    /// Min-SNR-gamma weights [B] for t [B] (Hang et al. 2023): min(SNR, gamma) on the x_0 error, expressed for the
    /// prediction's own target: / SNR for epsilon (eps error = SNR x x_0 error), / (SNR + 1) for v, as is for x_0.
    /// </summary>
    public Tensor MinSnrWeights(Tensor t)
    {
        var snr = B(t).SignalToNoise.index_select(0, t);
        // Held for the native call (TorchSharp's Scalar is not kept alive across it; see AdamOptimizer.Step).
        using var gamma = MinSnrGamma.ToScalar();
        using var one = 1.0f.ToScalar();
        var clipped = snr.clamp_max(gamma);
        return Prediction switch
        {
            PredictionType.Epsilon => clipped / snr,
            PredictionType.V => clipped / snr.add(one),
            PredictionType.X0 => clipped,
            _ => throw new InvalidOperationException($"prediction {Prediction} has no min-snr weight"),
        };
    }

    /// <summary>
    /// Bound terms per sample [B], in bits: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t &gt; 1 and
    /// -log p(x_0 | x_1) for t = 1 (discretized Gaussian decoder for images, eq. 13; a Gaussian density for 2-D data).
    /// Mean over a sample's elements (bits/dim) or their sum.
    /// </summary>
    public Tensor VbTerms(Tensor modelOutput, Tensor x0, Tensor xt, Tensor t, bool clipDenoised, bool reduceMean = true)
    {
        var (trueMean, trueLogVar) = QPosteriorMeanVariance(x0, xt, t);
        var p = PMeanVariance(modelOutput, xt, t, clipDenoised);
        var kl = GaussianMath.NormalKl(trueMean, trueLogVar, p.Mean, p.LogVariance);
        var nll = DiscreteData
            ? -GaussianMath.DiscretizedGaussianLogLikelihood(x0, p.Mean, 0.5f * p.LogVariance)
            : -GaussianMath.GaussianLogDensity(x0, p.Mean, p.LogVariance);
        var first = (t == 0L).reshape(BroadcastShape(t, xt));
        var terms = where(first, nll, kl) / Math.Log(2.0);
        return ReduceSample(terms, reduceMean);
    }

    /// <summary>L_T = KL(q(x_T | x_0) || N(0, I)) per sample [B], in bits per dimension.</summary>
    public Tensor PriorBpd(Tensor x0)
    {
        var tLast = full(new[] { x0.shape[0] }, (long)(T - 1), ScalarType.Int64, x0.device);
        var (mean, logVar) = QMeanVariance(x0, tLast);
        var zero = zeros_like(mean);
        return ReduceSample(GaussianMath.NormalKl(mean, logVar, zero, zero), true) / Math.Log(2.0);
    }

    private static long[] BroadcastShape(Tensor t, Tensor x)
    {
        var shape = new long[x.dim()];
        Array.Fill(shape, 1L);
        shape[0] = t.shape[0];
        return shape;
    }

    /// <summary>[B, ...] -> [B]: mean or sum over everything but the batch dimension (broadcasting first).</summary>
    internal static Tensor ReduceSample(Tensor x, bool mean)
    {
        var flat = x.reshape(x.shape[0], -1);
        return mean ? flat.mean(new long[] { 1 }) : flat.sum(1);
    }
}
