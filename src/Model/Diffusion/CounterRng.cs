using System.Runtime.InteropServices;

namespace DistDiffusion.Model.Diffusion;

/// <summary>
/// Counter-based random numbers: every value is a pure function of (key, position), computed in C#
/// with SplitMix64. Used for each sample's t, epsilon, flips and sampling noise, so results do not
/// depend on the device, the batch a sample lands in, the worker that computes it or torch's RNG.
/// </summary>
public static class CounterRng
{
    /// <summary>Uniform 64-bit value number <paramref name="position"/> of stream <paramref name="key"/>.</summary>
    public static ulong Bits(ulong key, ulong position) => SeedMix.Finalize(key ^ SeedMix.Finalize(position + 0x632BE59BD9B4E019UL));

    /// <summary>Uniform double in [0, 1) with 53 random bits.</summary>
    public static double Uniform(ulong key, ulong position) => (Bits(key, position) >> 11) * (1.0 / (1UL << 53));

    /// <summary>Uniform integer in [0, n) (Lemire's multiply-shift; bias below 2^-32 for n &lt; 2^32).</summary>
    public static long UniformInt(ulong key, ulong position, long n) => (long)(((UInt128)Bits(key, position) * (ulong)n) >> 64);

    /// <summary>Fills <paramref name="dst"/> with standard normal values (Box-Muller), positions firstPosition.. of stream key.</summary>
    public static void Normal(ulong key, Span<float> dst, ulong firstPosition = 0)
    {
        var pos = firstPosition;
        for (var i = 0; i < dst.Length; i += 2)
        {
            // u1 in (0, 1] so the log is finite.
            var u1 = 1.0 - Uniform(key, pos++);
            var u2 = Uniform(key, pos++);
            var r = Math.Sqrt(-2.0 * Math.Log(u1));
            var theta = 2.0 * Math.PI * u2;
            dst[i] = (float)(r * Math.Cos(theta));
            if (i + 1 < dst.Length) dst[i + 1] = (float)(r * Math.Sin(theta));
        }
    }

    /// <summary>
    /// A float32 tensor [keys.Length, ...shape] whose row i is standard normal noise from stream keys[i],
    /// built on the CPU and moved to <paramref name="device"/> in one copy.
    /// </summary>
    public static TorchSharp.torch.Tensor NormalRows(ReadOnlySpan<ulong> keys, long[] rowShape, TorchSharp.torch.Device device)
    {
        long per = 1;
        foreach (var d in rowShape) per *= d;
        var buf = new float[keys.Length * per];
        for (var i = 0; i < keys.Length; i++)
            Normal(keys[i], buf.AsSpan((int)(i * per), (int)per));
        var shape = new long[rowShape.Length + 1];
        shape[0] = keys.Length;
        rowShape.CopyTo(shape, 1);
        var cpu = TorchSharp.torch.tensor(buf, shape);
        if (device.type == TorchSharp.DeviceType.CPU) return cpu;
        using (cpu) return cpu.to(device);
    }

    /// <summary>Reinterprets floats as bytes (for checksums in tests and on the wire).</summary>
    public static ReadOnlySpan<byte> AsBytes(ReadOnlySpan<float> values) => MemoryMarshal.AsBytes(values);
}
