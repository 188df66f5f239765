using DistDiffusion.Model;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Networks;
using TorchSharp;

namespace DistDiffusion.Tests.Data;

public class SyntheticAndSplitTests
{
    public static TheoryData<DatasetKind> Kinds => [DatasetKind.SwissRoll, DatasetKind.TwoMoons, DatasetKind.Gaussians8];

    [Theory]
    [MemberData(nameof(Kinds))]
    public void SameSeedSamePointsOtherSeedOtherPoints(DatasetKind kind)
    {
        using var a = Synthetic2D.Generate(kind, 500, 42);
        using var b = Synthetic2D.Generate(kind, 500, 42);
        using var c = Synthetic2D.Generate(kind, 500, 43);
        Assert.Equal([500L, 2], a.shape);
        Assert.Equal(torch.ScalarType.Float32, a.dtype);
        Assert.Equal(a.data<float>().ToArray(), b.data<float>().ToArray());
        Assert.True(a.sub(c).abs().max().item<float>() > 0.1f);
        Assert.True(a.isfinite().all().item<bool>());
    }

    [Fact]
    public void SwissRollFollowsTheSklearnFormulaDividedByTen()
    {
        using var p = Synthetic2D.SwissRoll(4000, 7);
        var v = p.data<float>().ToArray();
        // radius ~ t / 10 with t in [1.5 pi, 4.5 pi]: about [0.47, 1.41], widened by the 0.05 noise
        for (var i = 0; i < 4000; i++)
        {
            var r = Math.Sqrt(v[2 * i] * v[2 * i] + v[2 * i + 1] * v[2 * i + 1]);
            Assert.InRange(r, 0.2, 1.75);
        }
        Assert.InRange(p.abs().max().item<float>(), 1.2f, 1.7f);
        // the roll's noise: points near radius-ordered angle; mean radius ~ E[t]/10 = 3 pi / 10
        using var radius = p.pow(2).sum(1).sqrt();
        Assert.InRange(radius.mean().item<float>(), 0.88f, 1.0f);
    }

    [Fact]
    public void TwoMoonsAndGaussians8HaveTheDocumentedShape()
    {
        using var m = Synthetic2D.TwoMoons(4000, 1);
        Assert.InRange(m[.., 0].min().item<float>(), -1.8f, -1.3f);
        Assert.InRange(m[.., 0].max().item<float>(), 1.3f, 1.8f);
        Assert.InRange(m[.., 1].abs().max().item<float>(), 0.6f, 1.0f);
        Assert.InRange(m.mean(new long[] { 0 }).abs().max().item<float>(), 0f, 0.05f);

        using var g = Synthetic2D.Gaussians8(4000, 1);
        var v = g.data<float>().ToArray();
        var hits = new int[8];
        for (var i = 0; i < 4000; i++)
        {
            var angle = Math.Atan2(v[2 * i + 1], v[2 * i]);
            var k = (int)Math.Round(angle / (Math.PI / 4) + 8) % 8;
            var cx = Synthetic2D.Gaussians8Radius * Math.Cos(k * Math.PI / 4);
            var cy = Synthetic2D.Gaussians8Radius * Math.Sin(k * Math.PI / 4);
            Assert.InRange(Math.Sqrt((v[2 * i] - cx) * (v[2 * i] - cx) + (v[2 * i + 1] - cy) * (v[2 * i + 1] - cy)), 0, 0.6);
            hits[k]++;
        }
        Assert.All(hits, h => Assert.InRange(h, 400, 600));
        Assert.InRange(g.std().item<float>(), 0.9f, 1.1f);
    }

    [Fact]
    public void GenerateRejectsImageKinds()
    {
        var e = Assert.Throws<ArgumentException>(() => Synthetic2D.Generate(DatasetKind.Mnist, 10, 0));
        Assert.Contains("Mnist", e.Message, StringComparison.Ordinal);
        Assert.Throws<ArgumentException>(() => Synthetic2D.Generate(DatasetKind.ImageFolder, 10, 0));
    }

    private static Dataset Numbered(int n)
    {
        // row i holds (i, -i), label i % 10: rows can be identified after a split
        var data = torch.arange(n, dtype: torch.ScalarType.Float32).unsqueeze(1) * torch.tensor(new float[] { 1, -1 });
        var labels = torch.arange(n, dtype: torch.ScalarType.Int64).remainder(10);
        return new Dataset(data, "numbered", labels);
    }

    [Fact]
    public void SplitIsDeterministicDisjointAndComplete()
    {
        using var ds = Numbered(1000);
        var (train, held) = ds.Split(0.1, 5);
        var (train2, held2) = ds.Split(0.1, 5);
        var (train3, held3) = ds.Split(0.1, 6);
        using (train) using (held) using (train2) using (held2) using (train3) using (held3)
        {
            Assert.Equal(900, train.Count);
            Assert.Equal(100, held.Count);
            Assert.Equal([2L], train.SampleShape);
            var t = train.Data[.., 0].data<float>().ToArray().Select(f => (int)f).ToArray();
            var h = held.Data[.., 0].data<float>().ToArray().Select(f => (int)f).ToArray();
            Assert.Empty(t.Intersect(h));
            Assert.Equal(Enumerable.Range(0, 1000), t.Concat(h).Order());
            Assert.Equal(h, held2.Data[.., 0].data<float>().ToArray().Select(f => (int)f));
            Assert.NotEqual(h, held3.Data[.., 0].data<float>().ToArray().Select(f => (int)f));
            // labels travel with their rows; not simply the first or last 100 rows
            Assert.Equal(h.Select(i => (long)(i % 10)), held.Labels!.data<long>().ToArray());
            Assert.NotEqual(Enumerable.Range(0, 100), h);
            Assert.NotEqual(Enumerable.Range(900, 100), h);
            Assert.Contains("held-out", held.Description, StringComparison.Ordinal);
        }
        Assert.Throws<ArgumentOutOfRangeException>(() => ds.Split(1.0, 0));
    }

    [Fact]
    public void GatherCopiesTheRequestedRows()
    {
        using var ds = Numbered(50);
        using var g = ds.Gather([3, 3, 49, 0]);
        Assert.Equal([4L, 2], g.shape);
        Assert.Equal([3f, -3, 3, -3, 49, -49, 0, 0], g.data<float>().ToArray());
        g.fill_(7f);
        Assert.Equal(3f, ds.Data[3, 0].item<float>());
        Assert.Throws<ArgumentOutOfRangeException>(() => ds.Gather([50]));
    }

    [Fact]
    public void LoaderDrawsIndependentSyntheticTrainAndHeldOutSets()
    {
        var recipe = new Recipe { Dataset = DatasetKind.TwoMoons, SyntheticSize = 300, Seed = 11 };
        var (train, held) = DatasetLoader.Load(recipe.ToDataOptions());
        var (train2, _) = DatasetLoader.Load(recipe.ToDataOptions());
        var (train3, _) = DatasetLoader.Load((recipe with { Seed = 12 }).ToDataOptions());
        using (train) using (held) using (train2) using (train3)
        {
            Assert.Equal(300, train.Count);
            Assert.Equal(300, held.Count);
            Assert.Equal(train.Data.data<float>().ToArray(), train2.Data.data<float>().ToArray());
            Assert.True(train.Data.sub(held.Data).abs().max().item<float>() > 0.1f);
            Assert.True(train.Data.sub(train3.Data).abs().max().item<float>() > 0.1f);
            using var expected = Synthetic2D.TwoMoons(300, (long)SeedMix.Mix(11L, 0L));
            Assert.Equal(expected.data<float>().ToArray(), train.Data.data<float>().ToArray());
        }
    }

    [Fact]
    public void LoaderSplitsMnistByRecipe()
    {
        var recipe = new Recipe { Dataset = DatasetKind.Mnist, DataPath = TestFiles.MnistFolder, Network = NetworkKind.UNet, HeldOutFraction = 0.2, Seed = 3 };
        var (train, held) = DatasetLoader.Load(recipe.ToDataOptions());
        using (train) using (held)
        {
            Assert.Equal(8000, train.Count);
            Assert.Equal(2000, held.Count);
            Assert.Equal([1L, 28, 28], held.SampleShape);
            Assert.Equal(8000, train.Labels!.shape[0]);
        }
    }
}
