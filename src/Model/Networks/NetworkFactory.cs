using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Training;

namespace DistDiffusion.Model.Networks;

/// <summary>Builds the denoiser a recipe asks for, after <see cref="Recipe.ValidateNetwork"/> checked that its configuration can work for the data shape.</summary>
public static class NetworkFactory
{
    /// <param name="recipe">uses Network, UNetLayout, widths/depths, Dropout, Variance, Timesteps.</param>
    /// <param name="dataShape">per-sample shape: [D] for points (D = 2 for the 2-D sets), [C, H, W] for images.</param>
    /// <exception cref="ArgumentException">an impossible configuration, naming the field, the value and what was expected.</exception>
    public static DenoiserNetwork Create(Recipe recipe, long[] dataShape)
    {
        ArgumentNullException.ThrowIfNull(recipe);
        recipe.ValidateNetwork(dataShape);
        var learnedVariance = recipe.Variance == VarianceType.LearnedRange;
        if (recipe.Network is not (NetworkKind.Mlp or NetworkKind.Sohl2015Mlp)) ConvolutionCheck.Ensure();   // once per process, before the first convolution
        return recipe.Network switch
        {
            NetworkKind.Mlp => new Mlp(recipe, dataShape, learnedVariance),
            NetworkKind.Sohl2015Mlp => new Sohl2015Mlp(recipe, dataShape, learnedVariance),
            _ => new UNet(recipe, dataShape, learnedVariance),
        };
    }
}
