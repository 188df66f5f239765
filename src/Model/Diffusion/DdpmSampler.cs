using static TorchSharp.torch;

namespace DistDiffusion.Model.Diffusion;

/// <summary>
/// Ancestral sampling, Ho et al. Algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I) for t &gt; 1,
/// and x_0 = mu_theta(x_1, 1). sigma_t^2 is the diffusion's variance (beta, beta-tilde or learned).
/// </summary>
public sealed class DdpmSampler : ReverseSampler
{
    public DdpmSampler(GaussianDiffusion diffusion, bool clipDenoised)
        : base(diffusion, clipDenoised, Enumerable.Range(0, diffusion.T).Reverse().ToArray())
    {
    }

    public override bool UsesNoise(int position) => Timesteps[position] > 0;

    public override Tensor Step(Tensor modelOutput, int position, Tensor xt, Tensor? noise)
    {
        var t = Timesteps[position];
        var p = Diffusion.PMeanVariance(modelOutput, xt, TimestepTensor(xt, t), ClipDenoised);
        if (t == 0) return p.Mean;
        ArgumentNullException.ThrowIfNull(noise);
        return p.Mean + (0.5f * p.LogVariance).exp() * noise;
    }
}
