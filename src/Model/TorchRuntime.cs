using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace DistDiffusion.Model;

/// <summary>
/// Process-wide native settings that must be in place before libtorch runs its first kernel. (The CPU convolution path is
/// chosen later, by <see cref="ConvolutionCheck"/>, when the first convolutional network is built.)
/// </summary>
public static class TorchRuntime
{
    /// <summary>oneDNN's instruction-set cap; the user's setting is honoured, and checked like the default (<see cref="ConvolutionCheck"/>).</summary>
    public const string IsaVariable = "ONEDNN_MAX_CPU_ISA";

    private static int _configured;

#pragma warning disable CA2255 // a library initializer is exactly what is needed: it must run before any kernel
    [ModuleInitializer]
    internal static void OnLoad() => EnsureConfigured();
#pragma warning restore CA2255

    /// <summary>Idempotent; call before any TorchSharp use (module initializers of our assemblies do).</summary>
    public static void EnsureConfigured()
    {
        if (Interlocked.Exchange(ref _configured, 1) == 1) return;
        KeepFreedMemory();
    }

    /// <summary>What glibc's allocator was told at start-up (null: nothing, e.g. the user set MALLOC_* or this is not glibc).</summary>
    public static string? MallocTuning { get; private set; }

    /// <summary>
    /// libtorch frees and re-allocates tensor-sized buffers every step (activations, gradients, optimizer temporaries). With
    /// glibc's defaults, blocks over the dynamic mmap threshold are mmap'ed and unmapped each time and a freed heap top is
    /// trimmed back to the kernel, so each step pays page faults to zero fresh pages. Keep freed memory in the process for
    /// reuse instead (mmap threshold 32 MiB, glibc's largest), but bound what it may hold: at most 64 MiB of free heap top,
    /// and two arenas, since every arena keeps its own free memory (with the default 8 per core the mnist-small workers
    /// grew by hundreds of MB). Measured here: a 128-sample swiss-roll MLP backward 5.2 -> 3.8 ms, forward 2.9 -> 2.3 ms;
    /// mnist-small with 2 workers 1.2 -> 2.1 steps/s; the soak benchmark checks that memory stays flat.
    /// A user's own MALLOC_* environment variables win.
    /// </summary>
    private static void KeepFreedMemory()
    {
        if (!OperatingSystem.IsLinux()) return;
        if (UserSetAllocator) return;
        const int TrimThreshold = -1, MmapThreshold = -3, ArenaMax = -8;   // mallopt parameters (malloc.h)
        try
        {
            // Setting the mmap threshold also turns glibc's dynamic threshold off.
            if (mallopt(MmapThreshold, MmapThresholdBytes) == 1 && mallopt(TrimThreshold, TrimThresholdBytes) == 1 && mallopt(ArenaMax, Arenas) == 1)
                MallocTuning = "mmap threshold 32 MiB, trim threshold 64 MiB, 2 arenas";
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            // not glibc (e.g. musl): leave the allocator alone
        }
    }

    // glibc's largest mmap threshold on 64-bit; free heap top it may keep; arenas (each keeps its own free memory).
    private const int MmapThresholdBytes = 32 << 20, TrimThresholdBytes = 64 << 20, Arenas = 2;

    private static bool UserSetAllocator =>
        Environment.GetEnvironmentVariables().Keys.Cast<string>().Any(k => k.StartsWith("MALLOC_", StringComparison.Ordinal));

    /// <summary>
    /// The same settings as environment variables, for processes we start (`coordinator run`'s workers): glibc reads them
    /// at exec, before any thread allocates, which keeps a worker's memory flatter than mallopt at start-up can (mnist-small
    /// workers: ~0.8 GB flat, against 1.0-1.4 GB and drifting). Empty where the user set MALLOC_* or this is not Linux.
    /// </summary>
    public static IReadOnlyDictionary<string, string> AllocatorEnvironment() =>
        !OperatingSystem.IsLinux() || UserSetAllocator ? new Dictionary<string, string>() : new Dictionary<string, string>
        {
            ["MALLOC_MMAP_THRESHOLD_"] = MmapThresholdBytes.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["MALLOC_TRIM_THRESHOLD_"] = TrimThresholdBytes.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["MALLOC_ARENA_MAX"] = Arenas.ToString(System.Globalization.CultureInfo.InvariantCulture),
        };

    [DllImport("libc.so.6", EntryPoint = "mallopt")]
    private static extern int mallopt(int parameter, int value);

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
        ConfiguredThreads = TorchSharp.torch.get_num_threads();
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
    /// triggered by another thread's allocation during that call can make the scalar unreachable, and the finalizer
    /// thread then frees it while libtorch reads it ("Unknown scalar type", "INTERNAL ASSERT FAILED at Scalar.h").
    /// The guard holds the finalizer thread for as long as any thread is inside a burst (see <see cref="FinalizerGate"/>),
    /// so every temporary created in the burst stays valid until the burst ends. Collections still run; threads are not
    /// serialized; nothing is allocated ahead. Re-entrant and safe from several threads at once.
    /// </summary>
    public static IDisposable Compute() => FinalizerGate.Enter();

    /// <summary>The intra-op thread count the process was configured with (--threads; 0 = all cores): what sampling uses.</summary>
    public static int ConfiguredThreads { get; private set; } = Environment.ProcessorCount;

    /// <summary>
    /// Sets this thread's intra-op thread count to <paramref name="threads"/> (a no-op when it is already). libtorch's CPU
    /// count is OpenMP's, which is per calling thread: a .NET thread-pool thread that never set it uses every core. Bits
    /// depend on it (reductions and the vector/scalar split of element-wise kernels follow the chunking), so work whose
    /// bits must repeat — micro-batch gradients, Adam, EMA — runs at 1 on whichever thread runs it, and sampling goes back
    /// to <see cref="ConfiguredThreads"/>. Not scoped: each change also resizes libtorch's process-wide pthreadpool and
    /// MKL's count, so it is changed only when the kind of work changes, never around each operation.
    /// </summary>
    public static void UseIntraOpThreads(int threads)
    {
        if (TorchSharp.torch.get_num_threads() != threads) TorchSharp.torch.set_num_threads(threads);
    }
}

/// <summary>
/// Defers finalization while torch work is in flight. The first thread to enter parks the finalizer thread inside the
/// finalizer of a sentinel object (one induced gen-0 collection makes the sentinel due, then we wait until its finalizer
/// runs, so everything queued before it has been finalized and everything queued after it waits). A native object that
/// becomes garbage during a burst is therefore finalized only after every burst in flight has ended: exactly the
/// lifetime TorchSharp 0.107 fails to guarantee for its temporaries.
/// <para>Parking costs a collection and a hand-off (~1 ms), so the finalizer stays parked between bursts that follow each
/// other closely (a training loop's steps): it is let go once no burst has been in flight for <see cref="IdleRelease"/>,
/// or at the end of a burst when it has been parked for <see cref="MaxParked"/>, so finalizers never wait much longer.</para>
/// </summary>
public static class FinalizerGate
{
    /// <summary>Release the finalizer after this long without a burst.</summary>
    public static readonly TimeSpan IdleRelease = TimeSpan.FromMilliseconds(100);
    /// <summary>Release the finalizer at the end of a burst once it has been parked this long.</summary>
    public static readonly TimeSpan MaxParked = TimeSpan.FromSeconds(1);

    private static readonly object Arm = new();
    private static int _inFlight;
    private static ManualResetEventSlim? _release;
    private static long _parkedAt, _lastLeave;
    private static long _armed;
    private static Timer? _idleTimer;

    /// <summary>How many times the finalizer thread was parked (tests and diagnostics).</summary>
    public static long TimesArmed => Interlocked.Read(ref _armed);

    /// <summary>Threads inside a burst right now.</summary>
    public static int InFlight => Volatile.Read(ref _inFlight);

    /// <summary>Whether the finalizer thread is parked now.</summary>
    public static bool Parked
    {
        get { lock (Arm) return _release is not null; }
    }

    public static IDisposable Enter()
    {
        lock (Arm)
        {
            if (_release is null) Park();
            _inFlight++;
        }
        return new Ticket();
    }

    private static void Leave()
    {
        lock (Arm)
        {
            _lastLeave = Environment.TickCount64;
            if (--_inFlight > 0) return;
            if (TimeSpan.FromMilliseconds(_lastLeave - _parkedAt) >= MaxParked) Release();
        }
    }

    /// <summary>Lets the finalizer thread go now if no burst is in flight (tests; the idle timer does it otherwise).</summary>
    public static void ReleaseIfIdle()
    {
        lock (Arm)
            if (_inFlight == 0 && _release is not null) Release();
    }

    private static void OnIdleTick(object? state)
    {
        lock (Arm)
            if (_inFlight == 0 && _release is not null && TimeSpan.FromMilliseconds(Environment.TickCount64 - _lastLeave) >= IdleRelease)
                Release();
    }

    private static void Release()
    {
        _release!.Set();
        _release = null;
    }

    private static void Park()
    {
        var parked = new ManualResetEventSlim();
        var release = new ManualResetEventSlim();
        MakeSentinel(parked, release);
        // The sentinel is new, so a gen-0 collection finds it dead; should another collection have promoted it first,
        // full collections find it. The finalizer thread reaches it after the finalizers queued before it.
        GC.Collect(0, GCCollectionMode.Forced, blocking: true);
        for (var tries = 0; !parked.Wait(TimeSpan.FromMilliseconds(200)); tries++)
        {
            if (tries == 50)
                throw new InvalidOperationException("the finalizer thread did not reach the finalizer gate within 10 s");
            GC.Collect();
        }
        _release = release;
        _parkedAt = Environment.TickCount64;
        Interlocked.Increment(ref _armed);
        _idleTimer ??= new Timer(OnIdleTick, null, IdleRelease, IdleRelease);
    }

    [MethodImpl(MethodImplOptions.NoInlining)]
    private static void MakeSentinel(ManualResetEventSlim parked, ManualResetEventSlim release) => _ = new Sentinel(parked, release);

    private sealed class Sentinel(ManualResetEventSlim parked, ManualResetEventSlim release)
    {
        ~Sentinel()
        {
            parked.Set();
            release.Wait();
            parked.Dispose();
            release.Dispose();
        }
    }

    private sealed class Ticket : IDisposable
    {
        private int _left;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _left, 1) == 0) Leave();
        }
    }
}
