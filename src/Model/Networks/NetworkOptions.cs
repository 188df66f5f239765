using System.Globalization;

namespace DistDiffusion.Model.Networks;

/// <summary>What the MLP denoisers read of a recipe (its hidden-size, hidden-layers, time-embedding-size and timesteps fields).</summary>
/// <param name="Timesteps">the number of per-timestep readouts of <see cref="Sohl2015Mlp"/>.</param>
public sealed record MlpOptions(int HiddenSize, int HiddenLayers, int TimeEmbeddingSize, int Timesteps);

/// <summary>What the U-Nets read of a recipe (the fields of the same names).</summary>
public sealed record UNetOptions(
    UNetLayout UNetLayout, int BaseChannels, int[] ChannelMultipliers, int ResBlocks, int GroupNormGroups,
    int AttentionHeads, int AttentionHeadSize, int[] AttentionResolutions);

/// <summary>
/// Everything <see cref="NetworkFactory.Create"/> needs: the kind of network, its dropout, whether it also predicts the
/// variance, and the options of each kind. Built from a recipe by <c>Recipe.ToNetworkOptions</c> (the one place), so the
/// networks do not depend on the training recipe; error messages still name the recipe's fields.
/// </summary>
/// <param name="Classes">0 for an unconditional network, else the number of class labels (U-Net only).</param>
public sealed record NetworkOptions(NetworkKind Network, double Dropout, bool LearnedVariance, int Classes, MlpOptions Mlp, UNetOptions UNet)
{
    /// <summary>
    /// Can these options build a network for data of per-sample shape <paramref name="dataShape"/> ([D] points,
    /// [C, H, W] images)? Throws naming the recipe field, its value and what was expected.
    /// </summary>
    /// <exception cref="ArgumentException">an impossible configuration.</exception>
    public void Validate(long[] dataShape)
    {
        ArgumentNullException.ThrowIfNull(dataShape);
        if (dataShape.Length == 0 || dataShape.Any(d => d < 1))
            throw new ArgumentException($"data shape [{string.Join(", ", dataShape)}]: expected positive sizes, [D] or [C, H, W]", nameof(dataShape));
        Check(Dropout >= 0 && Dropout < 1, "dropout", Dropout, "a value in [0, 1)");
        Check(Classes >= 0, "classes", Classes, "an integer >= 0 (0: unconditional)");
        Check(Classes == 0 || Network == NetworkKind.UNet, "classes", Classes, "0 for the MLPs (class conditioning is a U-Net option)");
        switch (Network)
        {
            case NetworkKind.Mlp:
            case NetworkKind.Sohl2015Mlp:
                Check(dataShape.Length == 1, "network", Network, $"unet for data of shape [{string.Join(", ", dataShape)}] (the MLPs take points [D])");
                Check(Mlp.HiddenSize >= 1, "hidden-size", Mlp.HiddenSize, "an integer >= 1");
                Check(Mlp.HiddenLayers >= 1, "hidden-layers", Mlp.HiddenLayers, "an integer >= 1");
                if (Network == NetworkKind.Mlp)
                    Check(Mlp.TimeEmbeddingSize >= 2, "time-embedding-size", Mlp.TimeEmbeddingSize, "an integer >= 2");
                else
                    Check(Mlp.Timesteps >= 1, "timesteps", Mlp.Timesteps, "an integer >= 1");
                break;
            case NetworkKind.UNet:
                Check(dataShape.Length == 3, "network", Network, $"mlp or sohl2015-mlp for data of shape [{string.Join(", ", dataShape)}] (the U-Net takes images [C, H, W])");
                var mults = UNet.ChannelMultipliers;
                Check(UNet.BaseChannels >= 2, "base-channels", UNet.BaseChannels, "an integer >= 2");
                Check(mults.Length >= 1 && mults.All(m => m >= 1), "channel-multipliers", string.Join(",", mults), "a list of integers >= 1");
                Check(UNet.ResBlocks >= 1, "res-blocks", UNet.ResBlocks, "an integer >= 1");
                Check(UNet.GroupNormGroups >= 1 && UNet.BaseChannels % UNet.GroupNormGroups == 0, "group-norm-groups", UNet.GroupNormGroups,
                    $"a divisor of base-channels ({UNet.BaseChannels}), so every stage's channels split into groups");
                if (UNet.UNetLayout == UNetLayout.Annotated)
                {
                    Check(UNet.AttentionHeads >= 1, "attention-heads", UNet.AttentionHeads, "an integer >= 1");
                    Check(UNet.AttentionHeadSize >= 1, "attention-head-size", UNet.AttentionHeadSize, "an integer >= 1");
                }
                var halvings = mults.Length - 1;
                var factor = 1L << halvings;
                foreach (var (side, name) in new[] { (dataShape[1], "height"), (dataShape[2], "width") })
                    Check(side % factor == 0, "channel-multipliers", string.Join(",", mults),
                        $"at most as many stages as the image {name} {side} can be halved: {mults.Length} stages need a side divisible by 2^{halvings} = {factor}");
                break;
            default:
                throw new ArgumentException($"recipe field 'network' = {Network}: expected mlp, sohl2015-mlp or unet");
        }
    }

    private static void Check(bool ok, string field, object value, string expected)
    {
        if (!ok)
            throw new ArgumentException($"recipe field '{field}' = {Convert.ToString(value, CultureInfo.InvariantCulture)}: expected {expected}");
    }
}
