namespace DistDiffusion.Model.Networks;

public enum NetworkKind
{
    /// <summary>MLP denoiser for 2-D data: sinusoidal time embedding, hidden ReLU layers.</summary>
    Mlp,
    /// <summary>Sohl-Dickstein et al. (2015): a shared MLP trunk and one output head per timestep.</summary>
    Sohl2015Mlp,
    /// <summary>The U-Net of the annotated diffusion model.</summary>
    UNet,
}
