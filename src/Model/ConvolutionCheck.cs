using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace DistDiffusion.Model;

/// <summary>Which kernels compute the CPU convolutions of this process.</summary>
public enum ConvolutionPath
{
    /// <summary>Not decided yet: no convolutional network has been built on the CPU.</summary>
    Unchecked,
    /// <summary>oneDNN at the best instruction set the machine has (or the user's ONEDNN_MAX_CPU_ISA), after it passed the self-check.</summary>
    OneDnn,
    /// <summary>ATen's own convolution (im2col + MKL GEMM): oneDNN failed the self-check on this machine.</summary>
    Aten,
    /// <summary>oneDNN without a self-check: libtorch's switch could not be reached (not Linux, or another libtorch build).</summary>
    OneDnnUnverified,
}

/// <summary>
/// A start-up self-check of the CPU convolution gradients, run once per process before the first convolutional network is
/// built on the CPU. oneDNN 3.7.1 (inside libtorch-cpu 2.10) was seen to return NaN or wrong convolution input gradients
/// from its JIT-compiled AVX-512 (and rarely AVX2) kernels on this project's machines (AMD EPYC): 32-39 of 81 small 3x3
/// shapes failed on 2026-11-23. Capping its instruction set at SSE4.1 avoided that but made the U-Net's convolutions
/// 2-3x slower on every machine, including the ones where oneDNN is right.
/// <para>So each process checks instead: for a set of small 3x3 convolutions (the shapes that failed), oneDNN's input and
/// weight gradients must be finite, identical over repeated calls, and equal within float rounding to ATen's own
/// convolution (<c>at::Context::setUserEnabledMkldnn(false)</c> routes convolutions to im2col + MKL GEMM). If any shape
/// fails, the process keeps ATen's convolution for good — slower than oneDNN at AVX-512 but faster than oneDNN at SSE4.1
/// here — and <see cref="Reason"/> says which shape failed. Both paths give exact, repeatable gradients; they differ from
/// each other in the last bits, so processes that must agree bit for bit agree because they run the same check on the same
/// machine. The check draws from its own generator, never torch's global one.</para>
/// </summary>
public static class ConvolutionCheck
{
    private static readonly Lock Gate = new();
    private static ConvolutionPath _path = ConvolutionPath.Unchecked;

    /// <summary>The path in force (Unchecked until a convolutional network was built on the CPU).</summary>
    public static ConvolutionPath Path { get { lock (Gate) return _path; } }

    /// <summary>Why the path was chosen: the failing shape, the check's timing, or why no check could run.</summary>
    public static string Reason { get; private set; } = "not checked yet";

    /// <summary>One line for logs: the path and its reason.</summary>
    public static string Describe() => Path switch
    {
        ConvolutionPath.OneDnn => $"oneDNN ({Reason})",
        ConvolutionPath.Aten => $"ATen im2col + GEMM ({Reason})",
        ConvolutionPath.OneDnnUnverified => $"oneDNN, unverified ({Reason})",
        _ => Reason,
    };

    /// <summary>
    /// Runs the check once per process (later calls return at once); call before building a convolutional network (every
    /// builder of one does). While it runs it flips libtorch's process-wide oneDNN switch, so no convolution may run on
    /// another thread meanwhile: it must come before the process's first convolution.
    /// </summary>
    public static ConvolutionPath Ensure()
    {
        lock (Gate)
        {
            if (_path != ConvolutionPath.Unchecked) return _path;
            TorchRuntime.EnsureConfigured();
            IntPtr context;
            try
            {
                if (!OperatingSystem.IsLinux()) throw new PlatformNotSupportedException("the libtorch switch is looked up by its Linux symbol name");
                context = GlobalContext();
                SetUserEnabledMkldnn(context, true);
            }
            catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException or PlatformNotSupportedException)
            {
                Reason = $"libtorch's oneDNN switch is not reachable: {e.Message}";
                return _path = ConvolutionPath.OneDnnUnverified;
            }
            var clock = System.Diagnostics.Stopwatch.StartNew();
            var failure = FirstFailure(context);
            if (failure is null)
            {
                Reason = $"self-check passed in {clock.Elapsed.TotalMilliseconds:F0} ms, ONEDNN_MAX_CPU_ISA={Environment.GetEnvironmentVariable(TorchRuntime.IsaVariable) ?? "(machine's best)"}";
                return _path = ConvolutionPath.OneDnn;
            }
            SetUserEnabledMkldnn(context, false);
            Reason = $"oneDNN failed the self-check: {failure}";
            return _path = ConvolutionPath.Aten;
        }
    }

    /// <summary>Channels and (batch, side) of the checked 3x3 convolutions: the small shapes oneDNN got wrong.</summary>
    public static readonly int[] Channels = [2, 4, 8, 16, 28];
    public static readonly (int Batch, int Side)[] Images = [(6, 14), (8, 28), (2, 32)];

    /// <summary>Identical oneDNN calls per shape (the bug showed as gradients that changed between identical calls).</summary>
    public const int Repeats = 2;

    /// <summary>
    /// The first shape whose oneDNN gradients are not finite, not repeatable, or not ATen's within float rounding (null: none),
    /// at this thread's intra-op thread count and at the configured one. Leaves oneDNN enabled.
    /// </summary>
    private static string? FirstFailure(IntPtr context)
    {
        var before = get_num_threads();
        try
        {
            foreach (var threads in new[] { 1, TorchRuntime.ConfiguredThreads }.Distinct())
            {
                TorchRuntime.UseIntraOpThreads(threads);
                foreach (var c in Channels)
                    foreach (var (b, side) in Images)
                        if (CheckShape(context, c, b, side) is { } problem)
                            return $"{c} channels, batch {b}, {side}x{side} px, {threads} thread(s): {problem}";
            }
            return null;
        }
        finally
        {
            SetUserEnabledMkldnn(context, true);
            TorchRuntime.UseIntraOpThreads(before);
        }
    }

    private static string? CheckShape(IntPtr context, int c, int b, int side)
    {
        using var compute = TorchRuntime.Compute();
        using var grad = enable_grad();
        using var scope = NewDisposeScope();
        using var generator = new Generator((ulong)(c * 1000 + b * 10 + side));
        var x0 = randn([b, c, side, side], generator: generator);
        var w = randn([c, c, 3, 3], generator: generator) * (1.0 / Math.Sqrt(9 * c));
        var upstream = randn([b, c, side, side], generator: generator);

        SetUserEnabledMkldnn(context, false);
        var (refInput, refWeight) = Gradients(x0, w, upstream);
        SetUserEnabledMkldnn(context, true);
        Tensor? firstInput = null, firstWeight = null;
        for (var i = 0; i < Repeats; i++)
        {
            var (gi, gw) = Gradients(x0, w, upstream);
            if (!gi.isfinite().all().item<bool>() || !gw.isfinite().all().item<bool>()) return "non-finite gradient";
            if (firstInput is null) { firstInput = gi; firstWeight = gw; continue; }
            if (!gi.eq(firstInput).all().item<bool>() || !gw.eq(firstWeight!).all().item<bool>()) return "gradient changed between identical calls";
        }
        if (Distance(firstInput!, refInput) is > Tolerance and var di) return $"input gradient differs from ATen's by {di:G3} of its scale";
        if (Distance(firstWeight!, refWeight) is > Tolerance and var dw) return $"weight gradient differs from ATen's by {dw:G3} of its scale";
        return null;
    }

    /// <summary>Largest difference relative to the reference's largest magnitude: float rounding of 9c-term sums stays far below.</summary>
    private const double Tolerance = 1e-4;

    private static double Distance(Tensor a, Tensor reference) =>
        (a - reference).abs().max().item<float>() / Math.Max(reference.abs().max().item<float>(), 1e-30);

    /// <summary>d(sum(conv(x, w) * upstream))/dx [B, C, H, W] and /dw [C, C, 3, 3].</summary>
    private static (Tensor Input, Tensor Weight) Gradients(Tensor x0, Tensor w0, Tensor upstream)
    {
        var x = x0.detach().clone().requires_grad_(true);
        var w = w0.detach().clone().requires_grad_(true);
        nn.functional.conv2d(x, w, padding: [1, 1]).mul(upstream).sum().backward();
        return (x.grad!.clone(), w.grad!.clone());
    }

    // at::globalContext() and at::Context::setUserEnabledMkldnn(bool): libtorch's C++ API (Itanium ABI; `this` comes first).
    [DllImport("libtorch_cpu", EntryPoint = "_ZN2at13globalContextEv")]
    private static extern IntPtr GlobalContext();

    [DllImport("libtorch_cpu", EntryPoint = "_ZN2at7Context20setUserEnabledMkldnnEb")]
    private static extern void SetUserEnabledMkldnn(IntPtr context, [MarshalAs(UnmanagedType.U1)] bool enabled);
}
