namespace DistDiffusion.Model.Diffusion;

/// <summary>
/// The one rule per sampler for its step count: DDPM (ancestral) runs all T steps; DDIM runs 1..T strided steps. A
/// requested count of 0 means all T for both. The local sampler, the CLI and the coordinator's Sampler service ask here.
/// </summary>
public static class SamplerSteps
{
    /// <summary>Why <paramref name="requested"/> steps do not work for <paramref name="kind"/> with T = <paramref name="timesteps"/>, or null when they do.</summary>
    public static string? Problem(SamplingMethod kind, long requested, int timesteps) => kind switch
    {
        SamplingMethod.Ddpm => requested == 0 || requested == timesteps ? null
            : $"steps = {requested}: DDPM ancestral sampling runs all T = {timesteps} steps (0 means all; use ddim for fewer)",
        SamplingMethod.Ddim => requested >= 0 && requested <= timesteps ? null
            : $"steps = {requested}: expected 1..{timesteps} for DDIM (0 means all)",
        _ => $"sampler {kind}: expected ddpm or ddim",
    };

    /// <summary>The steps <paramref name="kind"/> visits for a request of <paramref name="requested"/> (0: all T).</summary>
    /// <exception cref="ArgumentException">a count the sampler does not take (<see cref="Problem"/>).</exception>
    public static int Count(SamplingMethod kind, long requested, int timesteps) =>
        Problem(kind, requested, timesteps) is { } problem ? throw new ArgumentException(problem)
        : requested == 0 ? timesteps : (int)requested;
}
