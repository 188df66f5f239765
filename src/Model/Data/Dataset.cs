using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Data;

/// <summary>
/// An in-memory dataset on the CPU: images in [-1, 1] as [N, C, H, W] or 2-D points as [N, 2],
/// optionally with int64 labels. Owns its tensors (they are detached from any dispose scope).
/// </summary>
public sealed class Dataset : IDisposable
{
    private bool _disposed;

    public Dataset(Tensor data, string description, Tensor? labels = null)
    {
        ArgumentNullException.ThrowIfNull(data);
        ArgumentNullException.ThrowIfNull(description);
        if (data.dim() < 1)
            throw new ArgumentException($"dataset '{description}': data must have a leading sample dimension, got a scalar", nameof(data));
        if (data.dtype != ScalarType.Float32)
            throw new ArgumentException($"dataset '{description}': data must be float32, got {data.dtype}", nameof(data));
        if (data.device_type != DeviceType.CPU)
            throw new ArgumentException($"dataset '{description}': data must be on the CPU, got {data.device}", nameof(data));
        if (labels is not null)
        {
            if (labels.dim() != 1 || labels.shape[0] != data.shape[0])
                throw new ArgumentException($"dataset '{description}': labels must be [{data.shape[0]}], got [{string.Join(", ", labels.shape)}]", nameof(labels));
            if (labels.dtype != ScalarType.Int64)
                throw new ArgumentException($"dataset '{description}': labels must be int64, got {labels.dtype}", nameof(labels));
        }
        Data = data.DetachFromDisposeScope();
        Labels = labels?.DetachFromDisposeScope();
        Description = description;
    }

    /// <summary>[N, ...sampleShape] float32 on the CPU.</summary>
    public Tensor Data { get; }

    /// <summary>[N] int64, or null.</summary>
    public Tensor? Labels { get; }

    public long Count => Data.shape[0];

    public long[] SampleShape => Data.shape[1..];

    public string Description { get; }

    /// <summary>
    /// Splits into a training part and a held-out part of round(N * heldOutFraction) samples (at least
    /// one in each), chosen by a permutation that depends only on <paramref name="seed"/>. Both parts
    /// keep the original order of their samples. The parts are copies; this dataset is unchanged.
    /// </summary>
    public (Dataset Train, Dataset HeldOut) Split(double heldOutFraction, long seed)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (!(heldOutFraction > 0 && heldOutFraction < 1))
            throw new ArgumentOutOfRangeException(nameof(heldOutFraction), heldOutFraction, "expected a fraction in (0, 1)");
        var n = Count;
        if (n < 2)
            throw new InvalidOperationException($"dataset '{Description}' has {n} sample(s); splitting needs at least 2");
        var held = Math.Clamp((long)Math.Round(n * heldOutFraction), 1, n - 1);

        var perm = new long[n];
        for (long i = 0; i < n; i++) perm[i] = i;
        var rng = new DeterministicRandom(seed, (long)Randomness.SplitTag);
        for (var i = n - 1; i > 0; i--)
        {
            var j = rng.NextLong(i + 1);
            (perm[i], perm[j]) = (perm[j], perm[i]);
        }
        var heldIdx = perm[..(int)held];
        var trainIdx = perm[(int)held..];
        Array.Sort(heldIdx);
        Array.Sort(trainIdx);

        var train = Subset(trainIdx, $"{Description} [train part: {trainIdx.Length} of {n}, split seed {seed}]");
        var heldOut = Subset(heldIdx, $"{Description} [held-out part: {heldIdx.Length} of {n}, split seed {seed}]");
        return (train, heldOut);
    }

    /// <summary>A float32 copy of the given rows: [indices.Length, ...sampleShape].</summary>
    public Tensor Gather(ReadOnlySpan<long> indices)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        var n = Count;
        foreach (var i in indices)
            if (i < 0 || i >= n)
                throw new ArgumentOutOfRangeException(nameof(indices), i, $"index outside [0, {n}) of dataset '{Description}'");
        using var idx = torch.tensor(indices.ToArray(), dtype: ScalarType.Int64);
        return Data.index_select(0, idx);
    }

    /// <summary>The labels of the given rows; throws if the data set has none.</summary>
    public long[] GatherLabels(ReadOnlySpan<long> indices)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (Labels is null) throw new InvalidOperationException($"dataset '{Description}' has no labels (a class-conditional recipe needs labelled images)");
        var n = Count;
        var result = new long[indices.Length];
        var all = Labels.data<long>();
        for (var k = 0; k < indices.Length; k++)
        {
            var i = indices[k];
            if (i < 0 || i >= n)
                throw new ArgumentOutOfRangeException(nameof(indices), i, $"index outside [0, {n}) of dataset '{Description}'");
            result[k] = all[i];
        }
        return result;
    }

    private Dataset Subset(long[] indices, string description)
    {
        using var idx = torch.tensor(indices, dtype: ScalarType.Int64);
        var data = Data.index_select(0, idx);
        var labels = Labels?.index_select(0, idx);
        return new Dataset(data, description, labels);
    }

    public override string ToString() => $"{Description}: {Count} x [{string.Join(", ", SampleShape)}]";

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        Data.Dispose();
        Labels?.Dispose();
    }
}
