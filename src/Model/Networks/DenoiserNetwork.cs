using static TorchSharp.torch;

namespace DistDiffusion.Model.Networks;

/// <summary>
/// A denoiser eps_theta(x_t, t) (or x0 / v / mean, depending on the recipe's parameterization).
/// <para><c>forward(x, t)</c>: x [B, ...DataShape] float32, t [B] int64 timestep indices in 0..T-1.
/// Returns a tensor shaped like x, except that with a learned variance
/// (<see cref="LearnedVariance"/>) dim 1 is doubled: [B, 2C, H, W] for images, [B, 2D] for points.
/// The first half is the prediction, the second half the raw (unbounded) variance output v.</para>
/// <para>A class-conditional network (<see cref="Classes"/> &gt; 0) also reads one label per row of x, set with
/// <see cref="SetClassLabels"/> before forward: 0..Classes-1, or <see cref="NullLabel"/> for "no label".</para>
/// <para>Dropout is per sample (<see cref="SampleDropout"/>): in training mode with dropout &gt; 0 the caller
/// must set one seed per row of x with <see cref="SetSampleSeeds"/> before calling forward.</para>
/// </summary>
public abstract class DenoiserNetwork : nn.Module<Tensor, Tensor, Tensor>
{
    private readonly DropoutSeeds dropoutSeeds = new();

    private long[]? classLabels;

    protected DenoiserNetwork(string name, long[] dataShape, bool learnedVariance, double dropout, int classes = 0)
        : base(name)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(classes);
        DataShape = dataShape.ToArray();
        LearnedVariance = learnedVariance;
        DropoutRate = dropout;
        Classes = classes;
    }

    /// <summary>0 for an unconditional network, else the number of class labels it was trained with.</summary>
    public int Classes { get; }

    /// <summary>The "no label" token of a class-conditional network (its unconditional model): label index <see cref="Classes"/>.</summary>
    public long NullLabel => Classes;

    /// <summary>Per-sample data shape, e.g. [2] or [1, 28, 28].</summary>
    public long[] DataShape { get; }

    /// <summary>Whether dim 1 of the output is doubled to carry the variance output v.</summary>
    public bool LearnedVariance { get; }

    /// <summary>Dropout probability of every <see cref="SampleDropout"/> layer of the network.</summary>
    public double DropoutRate { get; }

    /// <summary>Per-sample dropout seeds for the next forward passes (one per row of x), or null.</summary>
    public void SetSampleSeeds(long[]? seeds) => dropoutSeeds.Seeds = seeds?.ToArray();

    /// <summary>The class label of each row of x for the next forward passes (0..Classes-1, or <see cref="NullLabel"/>), or null.
    /// Required by a class-conditional network, refused by an unconditional one.</summary>
    public void SetClassLabels(long[]? labels) => classLabels = labels?.ToArray();

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
        var labels = CheckedLabels(shape[0]);
        // Every intermediate is disposed when forward returns; autograd keeps what backward needs natively.
        using var scope = NewDisposeScope();
        return Denoise(x, t, labels is null ? null : tensor(labels, ScalarType.Int64, x.device)).MoveToOuterDisposeScope();
    }

    private long[]? CheckedLabels(long rows)
    {
        if (Classes == 0)
        {
            if (classLabels is not null)
                throw new InvalidOperationException($"{GetName()} is unconditional (classes = 0) but class labels were set");
            return null;
        }
        var labels = classLabels
            ?? throw new InvalidOperationException($"{GetName()} is class-conditional ({Classes} classes): call SetClassLabels with one label per sample ({NullLabel} for none) before forward");
        if (labels.Length != rows)
            throw new InvalidOperationException($"{labels.Length} class labels set but the batch has {rows} rows");
        foreach (var l in labels)
            if (l < 0 || l > Classes)
                throw new InvalidOperationException($"class label {l}: expected 0..{Classes - 1}, or {NullLabel} for no label");
        return labels;
    }

    /// <summary>The network body; x and t are validated, labels [B] int64 (0..Classes) is given exactly when the network is
    /// class-conditional. Must return a freshly computed tensor.</summary>
    private protected abstract Tensor Denoise(Tensor x, Tensor t, Tensor? labels);
}

/// <summary>Seeds shared by a network and its dropout layers (not a module: holds no tensors).</summary>
internal sealed class DropoutSeeds
{
    public long[]? Seeds { get; set; }
    public long NextLayerIndex { get; set; }
}
