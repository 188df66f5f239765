using System.Numerics;
using System.Runtime.InteropServices;

namespace DistDiffusion.Model.Optimization;

/// <summary>Element-wise float32 arithmetic on flat gradient vectors, in a fixed order so results repeat bit for bit.</summary>
public static class VectorMath
{
    /// <summary>total[i] += part[i] (float32, element by element).</summary>
    public static void AddInPlace(Span<float> total, ReadOnlySpan<float> part)
    {
        if (total.Length != part.Length) throw new ArgumentException($"adding {part.Length} elements to {total.Length}");
        var t = MemoryMarshal.Cast<float, Vector<float>>(total);
        var p = MemoryMarshal.Cast<float, Vector<float>>(part);
        for (var i = 0; i < t.Length; i++) t[i] += p[i];
        for (var i = t.Length * Vector<float>.Count; i < total.Length; i++) total[i] += part[i];
    }

    /// <summary>
    /// Sum of squares in double (finite exactly when every element is: even float.MaxValue squared, times 2^31 elements,
    /// stays below double's range), accumulated per vector lane then across lanes, so the result is the same on every run.
    /// </summary>
    public static double SumOfSquares(ReadOnlySpan<float> values)
    {
        var vectors = MemoryMarshal.Cast<float, Vector<float>>(values);
        var acc = Vector<double>.Zero;
        foreach (var v in vectors)
        {
            Vector.Widen(v, out var low, out var high);
            acc += low * low + high * high;
        }
        var total = Vector.Sum(acc);
        for (var i = vectors.Length * Vector<float>.Count; i < values.Length; i++) total += (double)values[i] * values[i];
        return total;
    }
}
