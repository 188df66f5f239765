namespace DistDiffusion.Model;

/// <summary>
/// Derives independent 64-bit seeds from tuples of integers (SplitMix64 finalizer over a running hash).
/// All per-sample randomness is seeded this way, e.g. <c>Mix(runSeed, step, sampleIndex)</c>, so a
/// sample's t, epsilon and dropout masks do not depend on which worker or batch it lands in.
/// </summary>
public static class SeedMix
{
    public static ulong Mix(ulong a, ulong b)
    {
        var z = a ^ (b + 0x9E3779B97F4A7C15UL + (a << 6) + (a >> 2));
        return Finalize(z);
    }

    public static ulong Mix(long a, long b) => Mix((ulong)a, (ulong)b);

    public static ulong Mix(long a, long b, long c) => Mix(Mix((ulong)a, (ulong)b), (ulong)c);

    public static ulong Mix(long a, long b, long c, long d) => Mix(Mix(Mix((ulong)a, (ulong)b), (ulong)c), (ulong)d);

    /// <summary>SplitMix64 output function (Steele et al. 2014).</summary>
    public static ulong Finalize(ulong z)
    {
        z += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }
}
