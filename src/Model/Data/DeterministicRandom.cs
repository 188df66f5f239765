namespace DistDiffusion.Model.Data;

/// <summary>
/// A small, fully specified pseudo-random generator (SplitMix64, Steele et al. 2014) so data drawn
/// from a seed is bit-identical on every machine and .NET version. Normals use Box-Muller.
/// </summary>
internal sealed class DeterministicRandom
{
    private ulong _state;

    public DeterministicRandom(ulong seed) => _state = seed;

    public DeterministicRandom(long seed, long stream) => _state = Randomness.SplitMixState(seed, stream);

    public ulong NextUInt64()
    {
        _state += 0x9E3779B97F4A7C15UL;
        var z = _state;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    /// <summary>Uniform in [0, 1) with 53 random bits.</summary>
    public double NextDouble() => (NextUInt64() >> 11) * (1.0 / (1UL << 53));

    /// <summary>Uniform integer in [0, n) (Lemire's multiply-shift; bias &lt; n / 2^64, negligible here).</summary>
    public long NextLong(long n)
    {
        if (n <= 0) throw new ArgumentOutOfRangeException(nameof(n), n, "expected n > 0");
        return (long)Math.BigMul(NextUInt64(), (ulong)n, out _);
    }

    /// <summary>Standard normal (Box-Muller, one value per call; simple and exactly reproducible).</summary>
    public double NextGaussian()
    {
        var u1 = 1.0 - NextDouble(); // (0, 1]
        var u2 = NextDouble();
        return Math.Sqrt(-2.0 * Math.Log(u1)) * Math.Cos(2.0 * Math.PI * u2);
    }
}
