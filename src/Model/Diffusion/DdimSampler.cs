using static TorchSharp.torch;

namespace DistDiffusion.Model.Diffusion;

/// <summary>
/// DDIM (Song et al. 2021, eq. 12) on a strided subset tau of the timesteps:
/// x_{tau_{i-1}} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z, with
/// sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev). eta = 0 is deterministic,
/// eta = 1 with every step matches DDPM with sigma^2 = beta-tilde.
/// </summary>
public sealed class DdimSampler : ReverseSampler
{
    public double Eta { get; }

    public DdimSampler(GaussianDiffusion diffusion, int steps, double eta, bool clipDenoised)
        : base(diffusion, clipDenoised, StridedTimesteps(diffusion.T, steps))
    {
        if (!(eta >= 0 && eta <= 1))
            throw new ArgumentException($"eta = {eta}: expected a value in [0, 1]", nameof(eta));
        Eta = eta;
    }

    /// <summary>K indices evenly spread over 0..T-1 (both ends included), descending: round(linspace(T-1, 0, K)).</summary>
    public static int[] StridedTimesteps(int T, int steps)
    {
        if (steps < 1 || steps > T)
            throw new ArgumentException($"steps = {steps}: expected 1..{T} (the diffusion has T = {T})", nameof(steps));
        if (steps == 1) return [T - 1];
        var ts = new int[steps];
        for (var i = 0; i < steps; i++)
            ts[i] = (int)Math.Round((T - 1) * (1.0 - (double)i / (steps - 1)), MidpointRounding.AwayFromZero);
        return ts;
    }

    public override bool UsesNoise(int position) => Eta > 0 && position + 1 < Timesteps.Count;

    public override Tensor Step(Tensor modelOutput, int position, Tensor xt, Tensor? noise)
    {
        var t = Timesteps[position];
        var s = Diffusion.Schedule;
        var abar = s.AlphasCumprod[t];
        var abarPrev = position + 1 < Timesteps.Count ? s.AlphasCumprod[Timesteps[position + 1]] : 1.0;
        var p = Diffusion.PMeanVariance(modelOutput, xt, TimestepTensor(xt, t), ClipDenoised);
        var sigma = Eta * Math.Sqrt((1 - abarPrev) / (1 - abar)) * Math.Sqrt(1 - abar / abarPrev);
        var dirCoef = Math.Sqrt(Math.Max(1 - abarPrev - sigma * sigma, 0.0));
        var mean = (float)Math.Sqrt(abarPrev) * p.PredX0 + (float)dirCoef * p.PredEps;
        if (!UsesNoise(position) || sigma == 0) return mean;
        ArgumentNullException.ThrowIfNull(noise);
        return mean + (float)sigma * noise;
    }
}
