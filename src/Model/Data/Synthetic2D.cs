using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Data;

/// <summary>
/// Toy 2-D distributions for diffusion experiments, drawn with <see cref="DeterministicRandom"/> so a
/// seed gives bit-identical points everywhere (torch's global generator is never touched).
/// All sets are roughly centred, with coordinates within about [-2, 2]. Result: [n, 2] float32.
/// </summary>
public static class Synthetic2D
{
    /// <summary>Noise of the swiss roll before the division by 10 (sklearn's <c>noise</c> parameter).</summary>
    public const double SwissRollNoise = 0.5;

    /// <summary>Gaussian noise standard deviation added to the two moons.</summary>
    public const double MoonsNoise = 0.05;

    /// <summary>Radius of the ring of 8 Gaussians: sqrt(2), so each coordinate has variance ~1 like the N(0, I) prior.</summary>
    public static readonly double Gaussians8Radius = Math.Sqrt(2.0);

    /// <summary>Standard deviation of each of the 8 Gaussians (modes ~11 std apart: clearly separated).</summary>
    public const double Gaussians8Std = 0.1;

    /// <summary>
    /// Swiss roll as in sklearn's make_swiss_roll projected on (x, z): t = 1.5 pi (1 + 2u), u ~ U[0, 1),
    /// point (t cos t, t sin t) + N(0, 0.5^2 I), all divided by 10, so coordinates lie within about [-1.4, 1.5].
    /// </summary>
    public static Tensor SwissRoll(int n, long seed)
    {
        CheckCount(n);
        var rng = new DeterministicRandom(seed, (long)DatasetKind.SwissRoll);
        var xy = new float[2 * n];
        for (var i = 0; i < n; i++)
        {
            var t = 1.5 * Math.PI * (1 + 2 * rng.NextDouble());
            xy[2 * i] = (float)((t * Math.Cos(t) + SwissRollNoise * rng.NextGaussian()) / 10.0);
            xy[2 * i + 1] = (float)((t * Math.Sin(t) + SwissRollNoise * rng.NextGaussian()) / 10.0);
        }
        return Points(xy, n);
    }

    /// <summary>
    /// Two interleaving half circles (sklearn's make_moons with uniform random angles): each point picks a
    /// moon with probability 1/2; upper (cos a, sin a), lower (1 - cos a, 0.5 - sin a), a ~ U[0, pi),
    /// plus N(0, 0.05^2 I); then shifted by (-0.5, -0.25) so the set is centred: x in [-1.5, 1.5], y in [-0.75, 0.75].
    /// </summary>
    public static Tensor TwoMoons(int n, long seed)
    {
        CheckCount(n);
        var rng = new DeterministicRandom(seed, (long)DatasetKind.TwoMoons);
        var xy = new float[2 * n];
        for (var i = 0; i < n; i++)
        {
            var lower = rng.NextDouble() < 0.5;
            var a = Math.PI * rng.NextDouble();
            double x, y;
            if (lower) { x = 1 - Math.Cos(a); y = 0.5 - Math.Sin(a); }
            else { x = Math.Cos(a); y = Math.Sin(a); }
            xy[2 * i] = (float)(x - 0.5 + MoonsNoise * rng.NextGaussian());
            xy[2 * i + 1] = (float)(y - 0.25 + MoonsNoise * rng.NextGaussian());
        }
        return Points(xy, n);
    }

    /// <summary>
    /// Mixture of 8 equally weighted Gaussians with std <see cref="Gaussians8Std"/> (0.1) centred on a circle of
    /// radius <see cref="Gaussians8Radius"/> (sqrt 2) at angles k pi / 4, k = 0..7.
    /// </summary>
    public static Tensor Gaussians8(int n, long seed)
    {
        CheckCount(n);
        var rng = new DeterministicRandom(seed, (long)DatasetKind.Gaussians8);
        var xy = new float[2 * n];
        for (var i = 0; i < n; i++)
        {
            var k = rng.NextLong(8);
            var angle = k * Math.PI / 4;
            xy[2 * i] = (float)(Gaussians8Radius * Math.Cos(angle) + Gaussians8Std * rng.NextGaussian());
            xy[2 * i + 1] = (float)(Gaussians8Radius * Math.Sin(angle) + Gaussians8Std * rng.NextGaussian());
        }
        return Points(xy, n);
    }

    /// <summary>Draws <paramref name="n"/> points of a synthetic kind; <see cref="ArgumentException"/> for image kinds.</summary>
    public static Tensor Generate(DatasetKind kind, int n, long seed) => kind switch
    {
        DatasetKind.SwissRoll => SwissRoll(n, seed),
        DatasetKind.TwoMoons => TwoMoons(n, seed),
        DatasetKind.Gaussians8 => Gaussians8(n, seed),
        _ => throw new ArgumentException($"{kind} is not a synthetic 2-D dataset (expected SwissRoll, TwoMoons or Gaussians8)", nameof(kind)),
    };

    /// <summary>Is <paramref name="kind"/> one of the synthetic 2-D sets?</summary>
    public static bool IsSynthetic(DatasetKind kind) => kind is DatasetKind.SwissRoll or DatasetKind.TwoMoons or DatasetKind.Gaussians8;

    private static void CheckCount(int n)
    {
        if (n < 1) throw new ArgumentOutOfRangeException(nameof(n), n, "expected at least one point");
    }

    private static Tensor Points(float[] xy, int n) => torch.tensor(xy, [n, 2], dtype: ScalarType.Float32);
}
