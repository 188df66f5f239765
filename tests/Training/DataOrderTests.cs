using DistDiffusion.Model.Training;

namespace DistDiffusion.Tests.Training;

public class DataOrderTests
{
    [Fact]
    public void EachEpochIsAPermutationSeededByRunSeedAndEpoch()
    {
        var order = new DataOrder(100, runSeed: 42);
        var e0 = order.Permutation(0).ToArray();
        var e1 = order.Permutation(1).ToArray();
        Assert.Equal(Enumerable.Range(0, 100).Select(i => (long)i), e0.Order());
        Assert.Equal(Enumerable.Range(0, 100).Select(i => (long)i), e1.Order());
        Assert.NotEqual(e0, e1);
        Assert.Equal(e0, new DataOrder(100, 42).Permutation(0));
        Assert.NotEqual(e0, new DataOrder(100, 43).Permutation(0));
    }

    [Fact]
    public void BatchesRunAcrossEpochBoundariesWithoutLosingOrRepeatingSamples()
    {
        var order = new DataOrder(10, runSeed: 1);
        var cursor = new DataCursor(0, 0);
        var seen = new List<long>();
        for (var i = 0; i < 5; i++)
        {
            var (idx, epochs, next) = order.NextBatch(cursor, 4);
            Assert.Equal(idx.Length, epochs.Length);
            Assert.Equal(idx.Length, idx.Zip(epochs).Distinct().Count()); // never the same (index, epoch) twice
            seen.AddRange(idx);
            cursor = next;
        }
        Assert.Equal(new DataCursor(2, 0), cursor);
        Assert.Equal(order.Permutation(0).Concat(order.Permutation(1)), seen);
        Assert.Throws<ArgumentException>(() => order.NextBatch(new DataCursor(0, 11), 4));
    }
}
