using System.Numerics;
using System.Runtime.InteropServices;

namespace DistDiffusion.Model.Optimization;

/// <summary>Element-wise float32 arithmetic on flat gradient vectors, in a fixed order so results repeat bit for bit.</summary>
public static class VectorMath
{
    /// <summary>Bit <paramref name="i"/> of a presence mask (parameter tensor i has a gradient), little-endian within each byte.</summary>
    public static bool IsPresent(ReadOnlySpan<byte> present, int i) => i / 8 < present.Length && (present[i / 8] & (1 << (i % 8))) != 0;

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
    public static double SumOfSquares(ReadOnlySpan<float> values) => SumOfSquares(values, []);

    /// <summary>
    /// <paramref name="source"/> copied into <paramref name="destination"/> and its <see cref="SumOfSquares(ReadOnlySpan{float})"/>
    /// (the same double, bit for bit) in one pass: each vector is summed as it is copied, instead of read a second time.
    /// </summary>
    public static double CopyWithSumOfSquares(ReadOnlySpan<float> source, Span<float> destination)
    {
        if (destination.Length != source.Length) throw new ArgumentException($"copying {source.Length} elements into {destination.Length}");
        return SumOfSquares(source, destination);
    }

    /// <param name="copy">Empty, or where <paramref name="values"/> are copied as they are read.</param>
    private static double SumOfSquares(ReadOnlySpan<float> values, Span<float> copy)
    {
        var vectors = MemoryMarshal.Cast<float, Vector<float>>(values);
        var into = MemoryMarshal.Cast<float, Vector<float>>(copy);
        var copying = !copy.IsEmpty;
        var acc = Vector<double>.Zero;
        for (var k = 0; k < vectors.Length; k++)
        {
            var v = vectors[k];
            if (copying) into[k] = v;
            Vector.Widen(v, out var low, out var high);
            acc += low * low + high * high;
        }
        var total = Vector.Sum(acc);
        for (var i = vectors.Length * Vector<float>.Count; i < values.Length; i++)
        {
            if (copying) copy[i] = values[i];
            total += (double)values[i] * values[i];
        }
        return total;
    }
}
