using DistDiffusion.Coordinator.Configuration;

namespace DistDiffusion.Coordinator.Training;

/// <summary>Why a slice gradient was refused by <see cref="SliceGuard"/>.</summary>
internal enum SliceFault
{
    None,
    /// <summary>An element is NaN or infinite.</summary>
    NonFinite,
    /// <summary>Finite, but its norm is beyond what one slice may contribute.</summary>
    OutOfBound,
}

/// <summary>
/// Bounds what one slice may contribute to a step. A slice gradient g_k (already divided by the global batch B, shape
/// [P]) is judged by its per-sample scale r_k = ||g_k||_2 * B / n_k, where n_k is the slice's sample count, so slices of
/// any size compare. Once <see cref="WarmupSlices"/> slices have been accepted, r_k may be at most
/// <see cref="Ratio"/> times the median of the last <see cref="Window"/> accepted ones; before that, at most
/// <see cref="AbsoluteBound"/>. A finite gradient of 1e15 per element (whose squares are still finite in float32 and
/// would poison Adam's second moment for thousands of steps) is refused either way.
/// <para>A refusal is not a verdict on the worker alone: the loop recomputes the slice on another worker, and a second,
/// independent result that is also out of bound is a real spike and is accepted (both non-finite: the run diverged).</para>
/// The loop's thread owns it.
/// </summary>
internal sealed class SliceGuard(double ratio = CoordinatorOptions.DefaultGradientBoundRatio)
{
    public const int Window = 64;
    public const int WarmupSlices = 16;
    /// <summary>Per-sample gradient scale refused before there is a history (far above any healthy network's).</summary>
    public const double AbsoluteBound = 1e6;

    private readonly double[] _recent = new double[Window];
    private int _count;

    public double Ratio { get; } = ratio >= 1 && double.IsFinite(ratio)
        ? ratio
        : throw new ArgumentOutOfRangeException(nameof(ratio), ratio, "expected a finite ratio >= 1");

    /// <summary>The largest per-sample scale accepted now.</summary>
    public double Bound => _count < WarmupSlices || !(Median() > 0) ? AbsoluteBound : Ratio * Median();

    /// <summary>Per-sample scale of a slice: ||g||_2 * B / n (NaN or infinity when the sum of squares is).</summary>
    public static double Scale(double sumOfSquares, int sliceSamples, int batchSize) =>
        Math.Sqrt(sumOfSquares) * batchSize / Math.Max(1, sliceSamples);

    /// <summary>Judges one slice; on refusal <paramref name="why"/> says what was found and what was expected.</summary>
    public SliceFault Check(double sumOfSquares, int sliceSamples, int batchSize, out string why)
    {
        var scale = Scale(sumOfSquares, sliceSamples, batchSize);
        if (!double.IsFinite(scale))
        {
            why = "the gradient has non-finite elements";
            return SliceFault.NonFinite;
        }
        var bound = Bound;
        if (scale > bound)
        {
            why = bound == AbsoluteBound
                ? $"per-sample gradient norm {scale:G4} exceeds the bound {bound:G4} that applies until {WarmupSlices} slices with a non-zero median are in"
                : $"per-sample gradient norm {scale:G4} exceeds {Ratio:G4} x the median {Median():G4} of the last {Math.Min(_count, Window)} slices";
            return SliceFault.OutOfBound;
        }
        why = "";
        return SliceFault.None;
    }

    /// <summary>Records an accepted slice's scale.</summary>
    public void Accepted(double sumOfSquares, int sliceSamples, int batchSize)
    {
        var scale = Scale(sumOfSquares, sliceSamples, batchSize);
        if (!double.IsFinite(scale)) return;
        _recent[_count % Window] = scale;
        _count++;
    }

    private double Median()
    {
        var n = Math.Min(_count, Window);
        if (n == 0) return double.NaN;
        var sorted = _recent.AsSpan(0, n).ToArray();
        Array.Sort(sorted);
        return n % 2 == 1 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
    }
}

/// <summary>
/// Training diverged: independent computations of the same slice agree that its gradient is not finite, or the step's
/// summed gradient is not. Nothing of the step was applied; the loop checkpoints the last completed step and stops.
/// </summary>
internal sealed class TrainingDivergedException(string message) : Exception(message);
