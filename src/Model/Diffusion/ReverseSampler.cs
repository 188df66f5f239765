using static TorchSharp.torch;

namespace DistDiffusion.Model.Diffusion;

/// <summary>
/// One reverse-process sampler: the descending timestep indices it visits and how one step maps
/// x_t to the next x given the network's output there. Knows nothing of networks.
/// </summary>
public abstract class ReverseSampler
{
    protected ReverseSampler(GaussianDiffusion diffusion, bool clipDenoised, IReadOnlyList<int> timesteps)
    {
        Diffusion = diffusion;
        ClipDenoised = clipDenoised;
        Timesteps = timesteps;
    }

    public GaussianDiffusion Diffusion { get; }
    public bool ClipDenoised { get; }

    /// <summary>Timestep indices visited, from the first (near T-1) down to 0.</summary>
    public IReadOnlyList<int> Timesteps { get; }

    /// <summary>Does step <paramref name="position"/> add fresh noise (so the caller must supply it)?</summary>
    public abstract bool UsesNoise(int position);

    /// <summary>
    /// One step at Timesteps[position]: modelOutput is the network's output for (xt, t) [B, C(*2), ...];
    /// noise [B, C, ...] standard normal (ignored where <see cref="UsesNoise"/> is false, may be null there).
    /// Returns x at the next visited timestep (x_0 after the last step).
    /// </summary>
    public abstract Tensor Step(Tensor modelOutput, int position, Tensor xt, Tensor? noise);

    /// <summary>Builds the sampler a request names.</summary>
    /// <param name="steps">the requested step count (<see cref="SamplerSteps"/>: 0 means all T).</param>
    public static ReverseSampler Create(GaussianDiffusion diffusion, SamplingMethod kind, int steps, double eta, bool clipDenoised)
    {
        var count = SamplerSteps.Count(kind, steps, diffusion.T);
        return kind == SamplingMethod.Ddpm
            ? new DdpmSampler(diffusion, clipDenoised)
            : new DdimSampler(diffusion, count, eta, clipDenoised);
    }

    protected static Tensor TimestepTensor(Tensor like, int t) =>
        full(new[] { like.shape[0] }, (long)t, ScalarType.Int64, like.device);
}
