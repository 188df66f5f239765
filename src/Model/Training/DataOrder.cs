namespace DistDiffusion.Model.Training;

/// <summary>Where the data stream stands: the epoch and the position within that epoch's permutation.</summary>
public readonly record struct DataCursor(long Epoch, long Position);

/// <summary>
/// The order in which training samples are visited: epoch e is a permutation of 0..N-1 seeded by
/// (run seed, e) (Fisher-Yates over SplitMix64). A global batch takes the next B indices, running
/// into the next epoch when the current one ends. Deterministic, so any process can rebuild any batch.
/// </summary>
public sealed class DataOrder
{
    private readonly long _count;
    private readonly long _seed;
    private long _cachedEpoch = -1;
    private long[] _cached = [];

    public DataOrder(long datasetSize, long runSeed)
    {
        if (datasetSize < 1) throw new ArgumentException($"dataset size = {datasetSize}: expected at least one sample");
        _count = datasetSize;
        _seed = runSeed;
    }

    public long DatasetSize => _count;

    /// <summary>The permutation of epoch <paramref name="epoch"/>.</summary>
    public long[] Permutation(long epoch)
    {
        if (epoch == _cachedEpoch) return _cached;
        var perm = new long[_count];
        for (long i = 0; i < _count; i++) perm[i] = i;
        var key = Randomness.EpochPermutation(_seed, epoch);
        for (var i = _count - 1; i > 0; i--)
        {
            var j = Diffusion.CounterRng.UniformInt(key, (ulong)i, i + 1);
            (perm[i], perm[j]) = (perm[j], perm[i]);
        }
        _cachedEpoch = epoch;
        _cached = perm;
        return perm;
    }

    /// <summary>
    /// The next <paramref name="batchSize"/> dataset indices from <paramref name="cursor"/>, the epoch each was drawn
    /// in (a batch that runs into the next epoch, or is larger than the data set, can hold an index more than once,
    /// but never twice from the same epoch), and the cursor after them.
    /// </summary>
    public (long[] Indices, long[] Epochs, DataCursor Next) NextBatch(DataCursor cursor, int batchSize)
    {
        if (batchSize < 1) throw new ArgumentException($"batch size = {batchSize}: expected >= 1");
        if (cursor.Epoch < 0 || cursor.Position < 0 || cursor.Position > _count)
            throw new ArgumentException($"data cursor (epoch {cursor.Epoch}, position {cursor.Position}): expected epoch >= 0 and 0 <= position <= {_count}");
        var result = new long[batchSize];
        var epochs = new long[batchSize];
        var (epoch, pos) = (cursor.Epoch, cursor.Position);
        for (var k = 0; k < batchSize; k++)
        {
            if (pos == _count) { epoch++; pos = 0; }
            epochs[k] = epoch;
            result[k] = Permutation(epoch)[pos++];
        }
        if (pos == _count) { epoch++; pos = 0; }
        return (result, epochs, new DataCursor(epoch, pos));
    }
}
