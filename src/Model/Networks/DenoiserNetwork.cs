using static TorchSharp.torch;

namespace DistDiffusion.Model.Networks;

/// <summary>
/// A denoiser eps_theta(x_t, t) (or x0 / v / mean, depending on the recipe's parameterization).
/// <para><c>forward(x, t)</c>: x [B, ...DataShape] float32, t [B] int64 timestep indices in 0..T-1.
/// Returns a tensor shaped like x, except that with a learned variance
/// (<see cref="LearnedVariance"/>) dim 1 is doubled: [B, 2C, H, W] for images, [B, 2D] for points.
/// The first half is the prediction, the second half the raw (unbounded) variance output v.</para>
/// <para>Dropout is per sample (<see cref="SampleDropout"/>): in training mode with dropout &gt; 0 the caller
/// must set one seed per row of x with <see cref="SetSampleSeeds"/> before calling forward.</para>
/// </summary>
public abstract class DenoiserNetwork : nn.Module<Tensor, Tensor, Tensor>
{
    private readonly DropoutSeeds dropoutSeeds = new();

    protected DenoiserNetwork(string name, long[] dataShape, bool learnedVariance, double dropout)
        : base(name)
    {
        DataShape = dataShape.ToArray();
        LearnedVariance = learnedVariance;
        DropoutRate = dropout;
    }

    /// <summary>Per-sample data shape, e.g. [2] or [1, 28, 28].</summary>
    public long[] DataShape { get; }

    /// <summary>Whether dim 1 of the output is doubled to carry the variance output v.</summary>
    public bool LearnedVariance { get; }

    /// <summary>Dropout probability of every <see cref="SampleDropout"/> layer of the network.</summary>
    public double DropoutRate { get; }

    /// <summary>Per-sample dropout seeds for the next forward passes (one per row of x), or null.</summary>
    public void SetSampleSeeds(long[]? seeds) => dropoutSeeds.Seeds = seeds?.ToArray();

    /// <summary>Creates the next dropout layer; layers are numbered 0, 1, ... in construction order.</summary>
    private protected SampleDropout NewDropout() => new(DropoutRate, dropoutSeeds, dropoutSeeds.NextLayerIndex++);

    public sealed override Tensor forward(Tensor x, Tensor t)
    {
        var shape = x.shape;
        if (shape.Length != DataShape.Length + 1 || !shape.AsSpan(1).SequenceEqual(DataShape))
            throw new ArgumentException($"x has shape [{string.Join(", ", shape)}]: expected [B, {string.Join(", ", DataShape)}]", nameof(x));
        if (t.dim() != 1 || t.shape[0] != shape[0])
            throw new ArgumentException($"t has shape [{string.Join(", ", t.shape)}]: expected [{shape[0]}] (one timestep per row of x)", nameof(t));
        if (t.dtype != ScalarType.Int64)
            throw new ArgumentException($"t has dtype {t.dtype}: expected Int64 timestep indices", nameof(t));
        if (training && DropoutRate > 0)
        {
            var seeds = dropoutSeeds.Seeds
                ?? throw new InvalidOperationException($"{GetName()} is in training mode with dropout {DropoutRate}: call SetSampleSeeds with one seed per sample before forward");
            if (seeds.Length != shape[0])
                throw new InvalidOperationException($"{seeds.Length} sample seeds set but the batch has {shape[0]} rows");
        }
        // Every intermediate is disposed when forward returns; autograd keeps what backward needs natively.
        using var scope = NewDisposeScope();
        return Denoise(x, t).MoveToOuterDisposeScope();
    }

    /// <summary>The network body; x and t are validated. Must return a freshly computed tensor.</summary>
    private protected abstract Tensor Denoise(Tensor x, Tensor t);
}

/// <summary>Seeds shared by a network and its dropout layers (not a module: holds no tensors).</summary>
internal sealed class DropoutSeeds
{
    public long[]? Seeds { get; set; }
    public long NextLayerIndex { get; set; }
}
