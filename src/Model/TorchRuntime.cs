using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace DistDiffusion.Model;

/// <summary>
/// Process-wide native settings that must be in place before libtorch runs its first kernel.
/// <para>oneDNN 3.7.1 (inside libtorch-cpu 2.10) computes wrong convolution input gradients — NaN or
/// garbage in up to half of small-channel 3x3 cases, more often with 2 threads — when it JIT-compiles
/// AVX-512 kernels (seen on AMD EPYC with AVX-512; AVX2 fails rarely, SSE4.1 never). Exact gradients are
/// the product's guarantee, so unless the user has set <c>ONEDNN_MAX_CPU_ISA</c> themselves it is capped
/// at SSE41 here (about 2.7x slower convolutions on this machine; see README). ATen's own kernels are unaffected.</para>
/// </summary>
public static class TorchRuntime
{
    public const string IsaVariable = "ONEDNN_MAX_CPU_ISA";
    public const string SafeIsa = "SSE41";

    private static int _configured;

    /// <summary>The oneDNN ISA cap in force for this process (the user's, ours, or null when none applies).</summary>
    public static string? OneDnnIsaCap { get; private set; }

#pragma warning disable CA2255 // a library initializer is exactly what is needed: it must run before any kernel
    [ModuleInitializer]
    internal static void OnLoad() => EnsureConfigured();
#pragma warning restore CA2255

    /// <summary>Idempotent; call before any TorchSharp use (module initializers of our assemblies do).</summary>
    public static void EnsureConfigured()
    {
        if (Interlocked.Exchange(ref _configured, 1) == 1) return;
        var user = Environment.GetEnvironmentVariable(IsaVariable);
        if (!string.IsNullOrEmpty(user))
        {
            OneDnnIsaCap = user;
            return;
        }
        if (!(OperatingSystem.IsLinux() || OperatingSystem.IsMacOS())) return;
        // .NET's Environment.SetEnvironmentVariable does not reach native getenv on Unix: use libc.
        if (setenv(IsaVariable, SafeIsa, 0) == 0) OneDnnIsaCap = SafeIsa;
        Environment.SetEnvironmentVariable(IsaVariable, SafeIsa);   // inherited by child processes
    }

    public const string OmpWaitVariable = "OMP_WAIT_POLICY";

    /// <summary>
    /// For processes that share the machine's cores with others (`coordinator run` and its workers): idle OpenMP
    /// threads sleep instead of spinning, which otherwise steals the cores the other processes compute on. Must run
    /// before libtorch loads; the user's own setting wins. Child processes inherit it.
    /// </summary>
    public static void PreferPassiveThreads()
    {
        if (!string.IsNullOrEmpty(Environment.GetEnvironmentVariable(OmpWaitVariable))) return;
        if ((OperatingSystem.IsLinux() || OperatingSystem.IsMacOS()) && setenv(OmpWaitVariable, "PASSIVE", 0) != 0)
            return;   // could not set it natively: leave the default
        Environment.SetEnvironmentVariable(OmpWaitVariable, "PASSIVE");
    }

    [DllImport("libc.so.6", EntryPoint = "setenv", CharSet = CharSet.Ansi, BestFitMapping = false, ThrowOnUnmappableChar = true)]
    private static extern int setenv([MarshalAs(UnmanagedType.LPStr)] string name, [MarshalAs(UnmanagedType.LPStr)] string value, int overwrite);

    /// <summary>
    /// The device a --device flag names (auto: CUDA when available, else CPU; cpu; cuda; cuda:N) after setting torch's
    /// CPU threads (0: all cores). Bad values throw <see cref="ArgumentException"/> naming the flag and what is accepted.
    /// </summary>
    public static TorchSharp.torch.Device ResolveDevice(string spec, int threads)
    {
        EnsureConfigured();
        if (threads < 0) throw new ArgumentException($"--threads {threads}: expected 0 (all cores) or a positive count");
        if (threads > 0) TorchSharp.torch.set_num_threads(threads);
        var s = spec.Trim().ToLowerInvariant();
        if (s == "auto") return TorchSharp.torch.cuda.is_available() ? TorchSharp.torch.CUDA : TorchSharp.torch.CPU;
        if (s == "cpu") return TorchSharp.torch.CPU;
        if (s.StartsWith("cuda", StringComparison.Ordinal))
        {
            if (!TorchSharp.torch.cuda.is_available())
                throw new ArgumentException($"--device {spec}: CUDA is not available in this build or on this machine (use cpu or auto)");
            return new TorchSharp.torch.Device(s);
        }
        throw new ArgumentException($"--device {spec}: expected auto, cpu, cuda or cuda:N");
    }

    /// <summary>
    /// Enter before a burst of torch work in a process where other threads run (gRPC, sampling next to training);
    /// dispose after. TorchSharp 0.107 creates temporary <c>Scalar</c>s (for every <c>a + b</c>, <c>x * 0.5</c>, ...)
    /// that have finalizers and are not kept alive across the native call they are passed to: a garbage collection
    /// triggered by another thread's allocation during that call can free the scalar while libtorch reads it
    /// ("Unknown scalar type", "INTERNAL ASSERT FAILED at Scalar.h"). The guard (1) lets one thread at a time run
    /// torch work and (2) holds a no-GC region, so no collection, hence no finalizer, can run until it ends.
    /// Re-entrant; cheap (a region starts with a collection of a small managed heap).
    /// </summary>
    public static IDisposable Compute() => new ComputeGuard();

    private sealed class ComputeGuard : IDisposable
    {
        private const long Budget = 200L << 20;   // allocations (by any thread) the region tolerates
        private static readonly object Gate = new();
        private readonly bool _region;
        private bool _disposed;

        public ComputeGuard()
        {
            Monitor.Enter(Gate);
            try
            {
                _region = GC.TryStartNoGCRegion(Budget);
            }
            catch (InvalidOperationException)
            {
                _region = false;   // nested on this thread: the outer guard holds the region
            }
        }

        public void Dispose()
        {
            if (_disposed) return;
            _disposed = true;
            try
            {
                if (_region && System.Runtime.GCSettings.LatencyMode == System.Runtime.GCLatencyMode.NoGCRegion)
                    GC.EndNoGCRegion();
            }
            catch (InvalidOperationException)
            {
                // the budget ran out and a collection already ended the region
            }
            finally
            {
                Monitor.Exit(Gate);
            }
        }
    }
}
