using DistDiffusion.Model.Diffusion;

namespace DistDiffusion.Tests.Diffusion;

public class CounterRngTests
{
    [Fact]
    public void NormalValuesHaveUnitMomentsAndDependOnlyOnKeyAndPosition()
    {
        var buf = new float[1_000_000];
        CounterRng.Normal(12345, buf);
        double sum = 0, sq = 0, quart = 0;
        foreach (var v in buf) { sum += v; sq += v * v; quart += (double)v * v * v * v; }
        var n = buf.Length;
        Assert.InRange(sum / n, -0.005, 0.005);
        Assert.InRange(sq / n, 0.99, 1.01);
        Assert.InRange(quart / n, 2.9, 3.1); // kurtosis of a Gaussian
        var again = new float[10];
        CounterRng.Normal(12345, again);
        Assert.Equal(buf.Take(10), again);
        var tail = new float[4];
        CounterRng.Normal(12345, tail, firstPosition: 6);
        Assert.Equal(buf.Skip(6).Take(4), tail);
        var other = new float[10];
        CounterRng.Normal(12346, other);
        Assert.NotEqual(again, other);
    }

    [Fact]
    public void UniformIntegersCoverTheRangeEvenly()
    {
        var counts = new int[7];
        for (ulong i = 0; i < 70_000; i++) counts[CounterRng.UniformInt(99, i, 7)]++;
        Assert.All(counts, c => Assert.InRange(c, 9_500, 10_500));
    }
}
