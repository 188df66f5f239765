using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Networks;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Networks;

/// <summary>Small recipes and inputs shared by the network tests (tiny widths so every forward is fast).</summary>
internal static class TestNetworks
{
    public const int Timesteps = 10;

    public static Recipe Mlp(NetworkKind kind = NetworkKind.Mlp, double dropout = 0, bool learnedVariance = false) => new()
    {
        Network = kind,
        HiddenSize = 16,
        HiddenLayers = 3,
        TimeEmbeddingSize = 8,
        Timesteps = Timesteps,
        Dropout = dropout,
        Variance = learnedVariance ? VarianceType.LearnedRange : VarianceType.FixedLarge,
        Loss = learnedVariance ? LossType.Kl : LossType.L2,
    };

    public static Recipe UNet(UNetLayout layout, int[] multipliers, double dropout = 0, bool learnedVariance = false, int[]? attention = null, int resBlocks = 1) => new()
    {
        Network = NetworkKind.UNet,
        UNetLayout = layout,
        BaseChannels = 8,
        GroupNormGroups = 4,
        ChannelMultipliers = multipliers,
        ResBlocks = resBlocks,
        AttentionHeads = 2,
        AttentionHeadSize = 4,
        AttentionResolutions = attention ?? [14, 16],
        Timesteps = Timesteps,
        Dropout = dropout,
        Variance = learnedVariance ? VarianceType.LearnedRange : VarianceType.FixedLarge,
        Loss = learnedVariance ? LossType.Kl : LossType.L2,
    };

    /// <summary>x ~ N(0, 1) [B, ...shape] and t in 0..T-1 [B], from a fixed generator.</summary>
    public static (Tensor X, Tensor T) Inputs(long batch, long[] shape, long seed = 1)
    {
        using var g = new Generator((ulong)seed);
        var x = randn(new[] { batch }.Concat(shape).ToArray(), generator: g);
        var t = randint(0, Timesteps, new[] { batch }, dtype: ScalarType.Int64, generator: g);
        return (x, t);
    }

    public static long[] Shape(params long[] dims) => dims;
}
