using static TorchSharp.torch;

namespace DistDiffusion.Model.Metrics;

/// <summary>
/// Memorization check for image models: the Euclidean distance from each sample to its nearest training
/// image. Distances far below those of held-out images to the training set mean the model copies.
/// </summary>
public static class NearestNeighbour
{
    /// <summary>Per-query distance [Q] to the nearest row of <paramref name="reference"/>; both flattened to [*, D].</summary>
    public static Tensor Distances(Tensor queries, Tensor reference, int chunk = 1024)
    {
        using var scope = NewDisposeScope();
        var q = queries.reshape(queries.shape[0], -1).to(ScalarType.Float32).cpu();
        var r = reference.reshape(reference.shape[0], -1).to(ScalarType.Float32).cpu();
        if (q.shape[1] != r.shape[1])
            throw new ArgumentException($"queries have {q.shape[1]} values each but the reference has {r.shape[1]}");
        var rNorm = r.square().sum(1);                                     // [R]
        Tensor? best = null;
        for (long start = 0; start < r.shape[0]; start += chunk)
        {
            var len = Math.Min(chunk, r.shape[0] - start);
            var rc = r.narrow(0, start, len);
            // |q - r|^2 = |q|^2 - 2 q.r + |r|^2   -> [Q, len]
            var d2 = q.square().sum(1, keepdim: true) - 2 * q.matmul(rc.t()) + rNorm.narrow(0, start, len).unsqueeze(0);
            var m = d2.min(1).values;
            best = best is null ? m : minimum(best, m);
        }
        return best!.clamp(min: 0).sqrt().DetachFromDisposeScope();
    }
}
