namespace DistDiffusion.Model.Networks;

public enum UNetLayout
{
    /// <summary>The annotated diffusion model's U-Net: weight-standardized convs, linear attention in every down/up stage, full attention in the middle.</summary>
    Annotated,
    /// <summary>Ho et al. (2020)'s CIFAR-10 U-Net (35.7M parameters at width 128, multipliers 1,2,2,2): full attention only at AttentionResolutions, ResBlocks + 1 blocks per up stage.</summary>
    Ho2020,
}
