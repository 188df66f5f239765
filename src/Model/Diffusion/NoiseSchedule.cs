using static TorchSharp.torch;

namespace DistDiffusion.Model.Diffusion;

/// <summary>
/// The forward-process variances beta_1..beta_T and every per-t coefficient derived from them
/// (Ho et al. 2020, sections 2 and 3). Index i = 0..T-1 stands for the paper's t = i + 1.
/// Computed once in double precision; float32 copies per device are made once and cached
/// (<see cref="On(Device)"/>), never per step. Immutable.
/// </summary>
public sealed class NoiseSchedule : IDisposable
{
    public int T { get; }
    public BetaSchedule Kind { get; }
    public double BetaStart { get; }
    public double BetaEnd { get; }

    /// <summary>beta_t.</summary>
    public IReadOnlyList<double> Betas => _betas;
    /// <summary>alpha_t = 1 - beta_t.</summary>
    public IReadOnlyList<double> Alphas { get; }
    /// <summary>alpha-bar_t = prod_{s &lt;= t} alpha_s.</summary>
    public IReadOnlyList<double> AlphasCumprod { get; }
    /// <summary>alpha-bar_{t-1}, with alpha-bar_0 = 1.</summary>
    public IReadOnlyList<double> AlphasCumprodPrev { get; }
    public IReadOnlyList<double> SqrtAlphasCumprod { get; }
    public IReadOnlyList<double> SqrtOneMinusAlphasCumprod { get; }
    /// <summary>sqrt(1 / alpha-bar_t), for x_0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps (eq. 4 inverted).</summary>
    public IReadOnlyList<double> SqrtRecipAlphasCumprod { get; }
    public IReadOnlyList<double> SqrtRecipM1AlphasCumprod { get; }
    /// <summary>beta-tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) (eq. 7).</summary>
    public IReadOnlyList<double> PosteriorVariance { get; }
    /// <summary>log beta-tilde_t with the t = 1 value (which is 0) replaced by beta-tilde_2.</summary>
    public IReadOnlyList<double> PosteriorLogVarianceClipped { get; }
    /// <summary>Coefficient of x_0 in mu-tilde_t (eq. 7): beta_t sqrt(abar_{t-1}) / (1 - abar_t).</summary>
    public IReadOnlyList<double> PosteriorMeanCoef1 { get; }
    /// <summary>Coefficient of x_t in mu-tilde_t (eq. 7): (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t).</summary>
    public IReadOnlyList<double> PosteriorMeanCoef2 { get; }
    /// <summary>log sigma^2 for sigma^2 = beta ("fixed large"), with t = 1 using beta-tilde_2 as improved-diffusion does (the decoder L_0 then has a sensible variance).</summary>
    public IReadOnlyList<double> FixedLargeLogVariance { get; }
    /// <summary>SNR(t) = abar_t / (1 - abar_t), the signal-to-noise ratio of x_t (Kingma et al. 2021, eq. 2).</summary>
    public IReadOnlyList<double> SignalToNoise { get; }

    private readonly double[] _betas;
    private readonly Dictionary<string, ScheduleBuffers> _buffers = new();
    private readonly Lock _lock = new();
    private bool _disposed;

    private NoiseSchedule(BetaSchedule kind, double[] betas, double betaStart, double betaEnd)
    {
        Kind = kind;
        BetaStart = betaStart;
        BetaEnd = betaEnd;
        T = betas.Length;
        _betas = betas;
        var n = betas.Length;
        var alphas = new double[n];
        var abar = new double[n];
        var abarPrev = new double[n];
        double running = 1.0;
        for (var i = 0; i < n; i++)
        {
            alphas[i] = 1.0 - betas[i];
            abarPrev[i] = running;
            running *= alphas[i];
            abar[i] = running;
        }
        Alphas = alphas;
        AlphasCumprod = abar;
        AlphasCumprodPrev = abarPrev;
        SqrtAlphasCumprod = abar.Select(Math.Sqrt).ToArray();
        SqrtOneMinusAlphasCumprod = abar.Select(a => Math.Sqrt(1.0 - a)).ToArray();
        SqrtRecipAlphasCumprod = abar.Select(a => Math.Sqrt(1.0 / a)).ToArray();
        SqrtRecipM1AlphasCumprod = abar.Select(a => Math.Sqrt(1.0 / a - 1.0)).ToArray();
        SignalToNoise = abar.Select(a => a / (1.0 - a)).ToArray();
        var postVar = new double[n];
        var coef1 = new double[n];
        var coef2 = new double[n];
        for (var i = 0; i < n; i++)
        {
            postVar[i] = betas[i] * (1.0 - abarPrev[i]) / (1.0 - abar[i]);
            coef1[i] = betas[i] * Math.Sqrt(abarPrev[i]) / (1.0 - abar[i]);
            coef2[i] = (1.0 - abarPrev[i]) * Math.Sqrt(alphas[i]) / (1.0 - abar[i]);
        }
        PosteriorVariance = postVar;
        PosteriorMeanCoef1 = coef1;
        PosteriorMeanCoef2 = coef2;
        // beta-tilde_1 = 0: clip its log to beta-tilde_2 (with T = 1 there is no second value: use beta_1).
        var clipped = n > 1 ? postVar[1] : betas[0];
        PosteriorLogVarianceClipped = postVar.Select((v, i) => Math.Log(i == 0 ? clipped : v)).ToArray();
        FixedLargeLogVariance = betas.Select((b, i) => Math.Log(i == 0 ? clipped : b)).ToArray();
    }

    /// <summary>Builds a schedule; throws <see cref="ArgumentException"/> naming the bad value.</summary>
    public static NoiseSchedule Create(BetaSchedule kind, int timesteps, double betaStart = 1e-4, double betaEnd = 0.02)
    {
        if (timesteps < 1)
            throw new ArgumentException($"timesteps = {timesteps}: expected an integer >= 1", nameof(timesteps));
        if (!(betaStart > 0 && betaStart < 1) || !(betaEnd > 0 && betaEnd < 1) || betaEnd < betaStart)
            throw new ArgumentException($"beta range [{betaStart}, {betaEnd}]: expected 0 < beta-start <= beta-end < 1");
        var n = timesteps;
        var betas = new double[n];
        // Evenly spaced points from a to b inclusive (numpy.linspace).
        static double Lin(double a, double b, int i, int n) => n == 1 ? a : a + (b - a) * i / (n - 1);
        switch (kind)
        {
            case BetaSchedule.Linear:
                for (var i = 0; i < n; i++) betas[i] = Lin(betaStart, betaEnd, i, n);
                break;
            case BetaSchedule.Quadratic:
                for (var i = 0; i < n; i++) betas[i] = Math.Pow(Lin(Math.Sqrt(betaStart), Math.Sqrt(betaEnd), i, n), 2);
                break;
            case BetaSchedule.Sigmoid:
                for (var i = 0; i < n; i++)
                {
                    var s = 1.0 / (1.0 + Math.Exp(-Lin(-6, 6, i, n)));
                    betas[i] = s * (betaEnd - betaStart) + betaStart;
                }
                break;
            case BetaSchedule.Cosine:
                // Nichol & Dhariwal eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2);
                // beta_t = 1 - abar(t)/abar(t-1), clipped to 0.999. betaStart/betaEnd are not used.
                const double s0 = 0.008;
                static double F(double u) => Math.Pow(Math.Cos((u + s0) / (1 + s0) * Math.PI / 2), 2);
                for (var i = 0; i < n; i++)
                    betas[i] = Math.Min(1 - F((i + 1.0) / n) / F((double)i / n), 0.999);
                break;
            default:
                throw new ArgumentException($"beta schedule {kind}: expected one of {string.Join(", ", Enum.GetNames<BetaSchedule>())}");
        }
        return new NoiseSchedule(kind, betas, betaStart, betaEnd);
    }

    /// <summary>The float32 buffers on <paramref name="device"/>: created on first use, then cached for the schedule's lifetime.</summary>
    public ScheduleBuffers On(Device device)
    {
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            var key = device.ToString();
            if (!_buffers.TryGetValue(key, out var b))
            {
                b = new ScheduleBuffers(this, device);
                _buffers[key] = b;
            }
            return b;
        }
    }

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed) return;
            _disposed = true;
            foreach (var b in _buffers.Values) b.Dispose();
            _buffers.Clear();
        }
    }
}

/// <summary>The schedule's per-t coefficients as float32 tensors [T] on one device. Read-only by convention.</summary>
public sealed class ScheduleBuffers : IDisposable
{
    public Device Device { get; }
    public Tensor Betas { get; }
    public Tensor AlphasCumprod { get; }
    public Tensor AlphasCumprodPrev { get; }
    public Tensor SqrtAlphasCumprod { get; }
    public Tensor SqrtOneMinusAlphasCumprod { get; }
    public Tensor SqrtRecipAlphasCumprod { get; }
    public Tensor SqrtRecipM1AlphasCumprod { get; }
    public Tensor SqrtOneMinusBetas { get; }
    public Tensor SqrtBetas { get; }
    public Tensor PosteriorVariance { get; }
    public Tensor PosteriorLogVarianceClipped { get; }
    public Tensor FixedLargeLogVariance { get; }
    public Tensor LogBetas { get; }
    public Tensor PosteriorMeanCoef1 { get; }
    public Tensor PosteriorMeanCoef2 { get; }
    public Tensor SignalToNoise { get; }
    private readonly List<Tensor> _all = new();

    internal ScheduleBuffers(NoiseSchedule s, Device device)
    {
        Device = device;
        Tensor Make(IEnumerable<double> values)
        {
            var t = tensor(values.Select(v => (float)v).ToArray(), dtype: ScalarType.Float32, device: device).DetachFromDisposeScope();
            _all.Add(t);
            return t;
        }
        Betas = Make(s.Betas);
        AlphasCumprod = Make(s.AlphasCumprod);
        AlphasCumprodPrev = Make(s.AlphasCumprodPrev);
        SqrtAlphasCumprod = Make(s.SqrtAlphasCumprod);
        SqrtOneMinusAlphasCumprod = Make(s.SqrtOneMinusAlphasCumprod);
        SqrtRecipAlphasCumprod = Make(s.SqrtRecipAlphasCumprod);
        SqrtRecipM1AlphasCumprod = Make(s.SqrtRecipM1AlphasCumprod);
        SqrtOneMinusBetas = Make(s.Alphas.Select(Math.Sqrt));
        SqrtBetas = Make(s.Betas.Select(Math.Sqrt));
        PosteriorVariance = Make(s.PosteriorVariance);
        PosteriorLogVarianceClipped = Make(s.PosteriorLogVarianceClipped);
        FixedLargeLogVariance = Make(s.FixedLargeLogVariance);
        LogBetas = Make(s.Betas.Select(b => Math.Log(b)));
        PosteriorMeanCoef1 = Make(s.PosteriorMeanCoef1);
        PosteriorMeanCoef2 = Make(s.PosteriorMeanCoef2);
        SignalToNoise = Make(s.SignalToNoise);
    }

    /// <summary>coef[t] reshaped to broadcast against x: [B] -> [B, 1, ..., 1] with x's rank.</summary>
    public static Tensor Extract(Tensor coef, Tensor t, Tensor x)
    {
        var shape = new long[x.dim()];
        Array.Fill(shape, 1L);
        shape[0] = t.shape[0];
        return coef.index_select(0, t).reshape(shape);
    }

    public void Dispose()
    {
        foreach (var t in _all) t.Dispose();
        _all.Clear();
    }
}
