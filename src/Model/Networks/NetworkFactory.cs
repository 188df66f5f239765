using System.Globalization;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Training;

namespace DistDiffusion.Model.Networks;

/// <summary>Builds the denoiser a recipe asks for, checking that its configuration can work for the data shape.</summary>
public static class NetworkFactory
{
    /// <param name="recipe">uses Network, UNetLayout, widths/depths, Dropout, Variance, Timesteps.</param>
    /// <param name="dataShape">per-sample shape: [D] for points (D = 2 for the 2-D sets), [C, H, W] for images.</param>
    /// <exception cref="ArgumentException">an impossible configuration, naming the field, the value and what was expected.</exception>
    public static DenoiserNetwork Create(Recipe recipe, long[] dataShape)
    {
        ArgumentNullException.ThrowIfNull(recipe);
        ArgumentNullException.ThrowIfNull(dataShape);
        if (dataShape.Length == 0 || dataShape.Any(d => d < 1))
            throw new ArgumentException($"data shape [{string.Join(", ", dataShape)}]: expected positive sizes, [D] or [C, H, W]", nameof(dataShape));
        Check(recipe.Dropout >= 0 && recipe.Dropout < 1, "dropout", recipe.Dropout, "a value in [0, 1)");
        var learnedVariance = recipe.Variance == VarianceType.LearnedRange;
        switch (recipe.Network)
        {
            case NetworkKind.Mlp:
            case NetworkKind.Sohl2015Mlp:
                Check(dataShape.Length == 1, "network", recipe.Network, $"unet for data of shape [{string.Join(", ", dataShape)}] (the MLPs take points [D])");
                Check(recipe.HiddenSize >= 1, "hidden-size", recipe.HiddenSize, "an integer >= 1");
                Check(recipe.HiddenLayers >= 1, "hidden-layers", recipe.HiddenLayers, "an integer >= 1");
                if (recipe.Network == NetworkKind.Mlp)
                {
                    Check(recipe.TimeEmbeddingSize >= 2, "time-embedding-size", recipe.TimeEmbeddingSize, "an integer >= 2");
                    return new Mlp(recipe, dataShape, learnedVariance);
                }
                Check(recipe.Timesteps >= 1, "timesteps", recipe.Timesteps, "an integer >= 1");
                return new Sohl2015Mlp(recipe, dataShape, learnedVariance);
            case NetworkKind.UNet:
                Check(dataShape.Length == 3, "network", recipe.Network, $"mlp or sohl2015-mlp for data of shape [{string.Join(", ", dataShape)}] (the U-Net takes images [C, H, W])");
                ValidateUNet(recipe, dataShape);
                return new UNet(recipe, dataShape, learnedVariance);
            default:
                throw new ArgumentException($"recipe field 'network' = {recipe.Network}: expected mlp, sohl2015-mlp or unet");
        }
    }

    private static void ValidateUNet(Recipe recipe, long[] dataShape)
    {
        var mults = recipe.ChannelMultipliers;
        Check(recipe.BaseChannels >= 2, "base-channels", recipe.BaseChannels, "an integer >= 2");
        Check(mults.Length >= 1 && mults.All(m => m >= 1), "channel-multipliers", string.Join(",", mults), "a list of integers >= 1");
        Check(recipe.ResBlocks >= 1, "res-blocks", recipe.ResBlocks, "an integer >= 1");
        Check(recipe.GroupNormGroups >= 1 && recipe.BaseChannels % recipe.GroupNormGroups == 0, "group-norm-groups", recipe.GroupNormGroups,
            $"a divisor of base-channels ({recipe.BaseChannels}), so every stage's channels split into groups");
        if (recipe.UNetLayout == UNetLayout.Annotated)
        {
            Check(recipe.AttentionHeads >= 1, "attention-heads", recipe.AttentionHeads, "an integer >= 1");
            Check(recipe.AttentionHeadSize >= 1, "attention-head-size", recipe.AttentionHeadSize, "an integer >= 1");
        }
        var halvings = mults.Length - 1;
        var factor = 1L << halvings;
        foreach (var (side, name) in new[] { (dataShape[1], "height"), (dataShape[2], "width") })
            Check(side % factor == 0, "channel-multipliers", string.Join(",", mults),
                $"at most as many stages as the image {name} {side} can be halved: {mults.Length} stages need a side divisible by 2^{halvings} = {factor}");
    }

    private static void Check(bool ok, string field, object value, string expected)
    {
        if (!ok)
            throw new ArgumentException($"recipe field '{field}' = {Convert.ToString(value, CultureInfo.InvariantCulture)}: expected {expected}");
    }
}
