namespace DistDiffusion.Model.Diffusion;

/// <summary>How beta_t grows over t = 1..T.</summary>
public enum BetaSchedule
{
    /// <summary>Ho et al. (2020): beta linear from BetaStart to BetaEnd.</summary>
    Linear,
    /// <summary>Nichol &amp; Dhariwal (2021), eq. 17: alpha-bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2), s = 0.008, betas clipped at 0.999.</summary>
    Cosine,
    /// <summary>sqrt(beta) linear from sqrt(BetaStart) to sqrt(BetaEnd).</summary>
    Quadratic,
    /// <summary>beta = sigmoid(linspace(-6, 6)) rescaled to [BetaStart, BetaEnd].</summary>
    Sigmoid,
}

/// <summary>What the network's (first) output predicts.</summary>
public enum PredictionType
{
    /// <summary>The noise epsilon (Ho et al. eq. 11/14, L_simple).</summary>
    Epsilon,
    /// <summary>The clean sample x_0.</summary>
    X0,
    /// <summary>The velocity v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans &amp; Ho 2022).</summary>
    V,
    /// <summary>The reverse-process mean directly, Sohl-Dickstein et al. (2015) form: mu = sqrt(1 - beta_t) x_t + sqrt(beta_t) f.</summary>
    Mean,
}

/// <summary>The variance Sigma_t of p(x_{t-1} | x_t).</summary>
public enum VarianceType
{
    /// <summary>sigma^2 = beta_t (Ho et al. "fixed large").</summary>
    FixedLarge,
    /// <summary>sigma^2 = beta-tilde_t, the posterior variance (Ho et al. "fixed small").</summary>
    FixedSmall,
    /// <summary>Learned per step: the network's second output v in [-1, 1] interpolates log sigma^2 between log beta-tilde and log beta.</summary>
    LearnedRange,
}

/// <summary>Per-element training loss.</summary>
public enum LossType
{
    /// <summary>Squared error (L_simple for epsilon prediction).</summary>
    L2,
    L1,
    /// <summary>Smooth L1 with delta 1 (as in the annotated diffusion model).</summary>
    Huber,
    /// <summary>The variational bound term L_{t-1}: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), with -log p(x_0 | x_1) at t = 1. Used with learned variances.</summary>
    Kl,
}

/// <summary>How each sample's loss is weighted by its timestep before the batch is reduced.</summary>
public enum LossWeighting
{
    /// <summary>Every t alike (L_simple, Ho et al. eq. 14).</summary>
    Uniform,
    /// <summary>
    /// Min-SNR-gamma (Hang et al. 2023, eq. 8): the x_0 error weighted by min(SNR(t), gamma), which for an epsilon target is
    /// min(SNR, gamma) / SNR and for a v target min(SNR, gamma) / (SNR + 1); it stops the easy low-noise steps from
    /// dominating the gradient.
    /// </summary>
    MinSnr,
}

/// <summary>How per-element losses become the batch loss.</summary>
public enum LossReduction
{
    /// <summary>Mean over the elements of a sample, then mean over the global batch.</summary>
    Mean,
    /// <summary>Sum over every element of the global batch (the reference recipes' "summed squared error").</summary>
    Sum,
}

/// <summary>Reverse-process sampler.</summary>
public enum SamplingMethod
{
    /// <summary>Ancestral sampling, Ho et al. Algorithm 2.</summary>
    Ddpm,
    /// <summary>Song et al. (2021) DDIM, eq. 12, on a strided subset of the timesteps.</summary>
    Ddim,
}
