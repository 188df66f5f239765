using DistDiffusion.Model.Metrics;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Metrics;

public sealed class FrechetDistanceTests
{
    [Fact]
    public void DiagonalGaussiansGiveTheClosedForm()
    {
        // |mu1 - mu2|^2 + sum_i (sqrt a_i - sqrt b_i)^2
        double[] a = [1, 4, 9, 0.25], b = [4, 1, 9, 1];
        using var mu1 = tensor(new double[] { 0, 0, 0, 0 });
        using var mu2 = tensor(new double[] { 1, 2, 0, -2 });
        using var s1 = diag(tensor(a));
        using var s2 = diag(tensor(b));
        var expected = (1 + 4 + 0 + 4) + a.Zip(b).Sum(p => Math.Pow(Math.Sqrt(p.First) - Math.Sqrt(p.Second), 2));
        Assert.Equal(expected, FrechetDistance.Distance(mu1, s1, mu2, s2), 10);
        Assert.Equal(expected, FrechetDistance.Distance(mu2, s2, mu1, s1), 10);
    }

    [Fact]
    public void NonCommutingCovariancesGiveTheTwoByTwoClosedForm()
    {
        // For 2x2: tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det(S1 S2))).
        using var s1 = tensor(new double[,] { { 2, 1 }, { 1, 3 } });
        using var s2 = tensor(new double[,] { { 1, -0.5 }, { -0.5, 4 } });
        using var mu = zeros(2, dtype: ScalarType.Float64);
        var tr12 = 2 * 1 + 1 * -0.5 + 1 * -0.5 + 3 * 4;                  // tr(S1 S2)
        var det12 = (2 * 3 - 1) * (1 * 4 - 0.25);                        // det S1 * det S2
        var expected = 5 + 5 - 2 * Math.Sqrt(tr12 + 2 * Math.Sqrt(det12));
        Assert.Equal(expected, FrechetDistance.Distance(mu, s1, mu, s2), 10);
    }

    [Fact]
    public void IdenticalSetsAreAtZeroAndShiftedSetsAtTheSquaredShift()
    {
        using var g = new Generator(7);
        using var x = randn(500, 16, dtype: ScalarType.Float64, generator: g);
        Assert.Equal(0, FrechetDistance.Distance(x, x), 6);
        using var shifted = x + 0.5;
        Assert.Equal(16 * 0.25, FrechetDistance.Distance(x, shifted), 6);
        // Fewer rows than features: a singular covariance is fine.
        using var few = x.narrow(0, 0, 5);
        Assert.Equal(0, FrechetDistance.Distance(few, few), 6);
    }

    [Fact]
    public void SampledGaussiansApproachTheirDistance()
    {
        using var g = new Generator(11);
        using var a = randn(20_000, 3, dtype: ScalarType.Float64, generator: g);
        using var scale = tensor(new double[] { 2, 1, 0.5 });
        using var b = randn(20_000, 3, dtype: ScalarType.Float64, generator: g) * scale + 1;
        var expected = 3 + (1 + 0 + 0.25);                               // |1|^2 * 3 + sum (1 - s)^2
        Assert.InRange(FrechetDistance.Distance(a, b), expected - 0.05, expected + 0.05);
    }

    [Fact]
    public void MismatchedShapesAreRefused()
    {
        using var a = zeros(4, 3);
        using var b = zeros(4, 2);
        Assert.Contains("same D", Assert.Throws<ArgumentException>(() => FrechetDistance.Distance(a, b)).Message);
        using var one = zeros(1, 3);
        Assert.Contains("at least 2 rows", Assert.Throws<ArgumentException>(() => FrechetDistance.Distance(one, a)).Message);
    }
}
