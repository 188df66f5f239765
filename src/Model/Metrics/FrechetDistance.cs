using static TorchSharp.torch;

namespace DistDiffusion.Model.Metrics;

/// <summary>
/// The Fréchet distance between two Gaussians fitted to feature sets (the "FID" formula):
/// |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), in float64. The square roots come from
/// symmetric eigendecompositions (eigenvalues clamped at 0), so singular covariances (fewer images than
/// features) are fine; S1^1/2 S2 S1^1/2 is symmetric PSD and has the same trace root as (S1 S2)^1/2.
/// </summary>
public static class FrechetDistance
{
    /// <summary>Mean [D] and unbiased covariance [D, D] (float64) of feature rows [N, D], N >= 2.</summary>
    public static (Tensor Mean, Tensor Covariance) Moments(Tensor features)
    {
        ArgumentNullException.ThrowIfNull(features);
        if (features.dim() != 2)
            throw new ArgumentException($"features must be [N, D], got [{string.Join(", ", features.shape)}]", nameof(features));
        if (features.shape[0] < 2)
            throw new ArgumentException($"features: a covariance needs at least 2 rows, got {features.shape[0]}", nameof(features));
        using var scope = NewDisposeScope();
        var x = features.to(ScalarType.Float64).cpu();
        var mean = x.mean([0]);
        var centred = x - mean.unsqueeze(0);
        var cov = centred.t().matmul(centred) / (x.shape[0] - 1);
        return (mean.DetachFromDisposeScope(), cov.DetachFromDisposeScope());
    }

    /// <summary>The distance between the Gaussians fitted to two feature sets [N1, D] and [N2, D].</summary>
    public static double Distance(Tensor a, Tensor b)
    {
        ArgumentNullException.ThrowIfNull(a);
        ArgumentNullException.ThrowIfNull(b);
        if (a.dim() != 2 || b.dim() != 2 || a.shape[1] != b.shape[1])
            throw new ArgumentException($"feature sets must be [N, D] with the same D, got [{string.Join(", ", a.shape)}] and [{string.Join(", ", b.shape)}]");
        var (m1, s1) = Moments(a);
        var (m2, s2) = Moments(b);
        using (m1) using (s1) using (m2) using (s2)
            return Distance(m1, s1, m2, s2);
    }

    /// <summary>The distance between N(mu1, S1) and N(mu2, S2); S1, S2 symmetric positive semi-definite.</summary>
    public static double Distance(Tensor mu1, Tensor s1, Tensor mu2, Tensor s2)
    {
        ArgumentNullException.ThrowIfNull(mu1);
        ArgumentNullException.ThrowIfNull(s1);
        ArgumentNullException.ThrowIfNull(mu2);
        ArgumentNullException.ThrowIfNull(s2);
        var d = mu1.shape[0];
        foreach (var (name, t, shape) in new[] { ("mu1", mu1, new[] { d }), ("mu2", mu2, new[] { d }), ("S1", s1, new[] { d, d }), ("S2", s2, new[] { d, d }) })
            if (!t.shape.SequenceEqual(shape))
                throw new ArgumentException($"{name} must be [{string.Join(", ", shape)}], got [{string.Join(", ", t.shape)}]");
        using var scope = NewDisposeScope();
        var c1 = Symmetric(s1);
        var c2 = Symmetric(s2);
        var root1 = SquareRoot(c1);
        var middle = Symmetric(root1.matmul(c2).matmul(root1));
        var traceRoot = linalg.eigvalsh(middle).clamp(min: 0).sqrt().sum();
        var diff = mu1.to(ScalarType.Float64).cpu() - mu2.to(ScalarType.Float64).cpu();
        var distance = diff.dot(diff) + c1.trace() + c2.trace() - 2 * traceRoot;
        // Rounding can leave a tiny negative value for (nearly) identical distributions.
        return Math.Max(0, distance.item<double>());
    }

    private static Tensor Symmetric(Tensor s)
    {
        var x = s.to(ScalarType.Float64).cpu();
        return (x + x.t()) / 2;
    }

    private static Tensor SquareRoot(Tensor symmetric)
    {
        var (values, vectors) = linalg.eigh(symmetric);
        return (vectors * values.clamp(min: 0).sqrt().unsqueeze(0)).matmul(vectors.t());
    }
}
