using DistDiffusion.Model.Optimization;

namespace DistDiffusion.Tests.Training;

/// <summary>The flat-vector arithmetic the coordinator runs on every gradient.</summary>
public sealed class VectorMathTests
{
    /// <summary>
    /// The coordinator copies a gradient out of a worker's shared region and takes its sum of squares (for the slice
    /// guard) in one pass: the same double, bit for bit, as the separate sum, and an exact copy, whatever the length's
    /// remainder after whole vectors.
    /// </summary>
    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    [InlineData(7)]
    [InlineData(8)]
    [InlineData(17)]
    [InlineData(477_443)]
    public void CopyWithSumOfSquaresIsTheSumOfSquaresBitForBitAndAnExactCopy(int length)
    {
        var random = new Random(1234);
        var source = Enumerable.Range(0, length).Select(_ => (float)(random.NextDouble() * 2 - 1) * MathF.Pow(10, random.Next(-6, 6))).ToArray();
        var destination = new float[length];
        var fused = VectorMath.CopyWithSumOfSquares(source, destination);
        Assert.Equal(BitConverter.DoubleToInt64Bits(VectorMath.SumOfSquares(source)), BitConverter.DoubleToInt64Bits(fused));
        Assert.Equal(source, destination);
    }

    [Fact]
    public void SumOfSquaresOfOneToAThousandIsExact()
    {
        var values = Enumerable.Range(1, 1000).Select(i => (float)i).ToArray();
        Assert.Equal(333_833_500.0, VectorMath.SumOfSquares(values));
        Assert.Equal(333_833_500.0, VectorMath.CopyWithSumOfSquares(values, new float[1000]));
    }

    [Fact]
    public void ADestinationOfAnotherLengthIsRefused()
    {
        var e = Assert.Throws<ArgumentException>(() => VectorMath.CopyWithSumOfSquares(new float[10], new float[9]));
        Assert.Contains("10 elements into 9", e.Message, StringComparison.Ordinal);
    }
}
