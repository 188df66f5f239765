using DistDiffusion.Model.Diffusion;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Metrics;

/// <summary>
/// Sliced Wasserstein-2 distance between two point clouds [N, D] and [M, D]: the root mean, over
/// K random unit directions, of the squared W2 distance between the 1-D projections, each computed
/// by matching quantiles (sorting). Directions are drawn from a fixed seed so figures are comparable.
/// </summary>
public static class SlicedWasserstein
{
    public static double Distance(Tensor a, Tensor b, int projections = 256, long seed = 0)
    {
        if (a.dim() != 2 || b.dim() != 2 || a.shape[1] != b.shape[1])
            throw new ArgumentException($"point clouds must be [N, D] and [M, D] with the same D; got [{string.Join(",", a.shape)}] and [{string.Join(",", b.shape)}]");
        if (a.shape[0] < 2 || b.shape[0] < 2)
            throw new ArgumentException("each point cloud needs at least 2 points");
        using var scope = NewDisposeScope();
        var d = a.shape[1];
        var keys = Enumerable.Range(0, projections).Select(i => Randomness.SlicedWassersteinDirection(seed, i)).ToArray();
        var dirs = CounterRng.NormalRows(keys, [d], CPU).to(ScalarType.Float64);
        dirs = dirs / dirs.norm(1, keepdim: true);                          // [K, D]
        var pa = a.to(ScalarType.Float64).cpu().matmul(dirs.t()).sort(0).Values;   // [N, K]
        var pb = b.to(ScalarType.Float64).cpu().matmul(dirs.t()).sort(0).Values;   // [M, K]
        // Compare at common quantile levels (the larger sample's size) by linear interpolation.
        var n = Math.Max(pa.shape[0], pb.shape[0]);
        var qa = Quantiles(pa, n);
        var qb = Quantiles(pb, n);
        return Math.Sqrt((qa - qb).square().mean().item<double>());
    }

    /// <summary>Values of sorted columns [N, K] at n evenly spaced quantile levels -> [n, K].</summary>
    private static Tensor Quantiles(Tensor sorted, long n)
    {
        var m = sorted.shape[0];
        if (m == n) return sorted;
        var pos = linspace(0, m - 1, n, dtype: ScalarType.Float64);
        var lo = pos.floor().to(ScalarType.Int64);
        var hi = (lo + 1).clamp(max: m - 1);
        var w = (pos - lo.to(ScalarType.Float64)).unsqueeze(1);
        return sorted.index_select(0, lo) * (1 - w) + sorted.index_select(0, hi) * w;
    }
}
