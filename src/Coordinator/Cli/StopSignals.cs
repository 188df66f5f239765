using System.Runtime.InteropServices;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>
/// The signals that ask a long-running verb (`run`, `serve`, `train`) to stop cleanly: SIGINT (Ctrl+C, or
/// `kill -INT` from a script or supervisor), SIGQUIT (Ctrl+\) and SIGTERM (`kill`, Kubernetes). Each cancels the
/// verb's token; the verb then checkpoints its last completed step and exits with 128 + the signal's number: 130 for
/// SIGINT, 131 for SIGQUIT, 143 for SIGTERM, as a worker does (<see cref="Worker.WorkerCli.SignalExitCode"/>). A run
/// whose training had completed when the signal came exits 0.
/// </summary>
internal static class StopSignals
{
    /// <summary>Until disposed, the three signals cancel <paramref name="cts"/> instead of ending the process.</summary>
    public static Registration Register(CancellationTokenSource cts) => new(cts);

    /// <summary>The signal handlers of one verb, and the first signal they received.</summary>
    internal sealed class Registration : IDisposable
    {
        private readonly List<PosixSignalRegistration> _registrations;
        private int _received = NoSignal;
        private const int NoSignal = int.MinValue;   // PosixSignal values are negative (SIGINT is -2)

        public Registration(CancellationTokenSource cts) =>
            _registrations = [.. Worker.WorkerCli.StopSignals.Select(s => PosixSignalRegistration.Create(s, c =>
            {
                c.Cancel = true;
                Interlocked.CompareExchange(ref _received, (int)c.Signal, NoSignal);
                cts.Cancel();
            }))];

        /// <summary>The first stop signal received, if any.</summary>
        public PosixSignal? Received => Volatile.Read(ref _received) is var r and not NoSignal ? (PosixSignal)r : null;

        /// <summary>The exit code of a verb this stopped: 128 + the signal's number (130 when cancelled otherwise).</summary>
        public int ExitCode => Received is { } s ? Worker.WorkerCli.SignalExitCode(s) : 130;

        public void Dispose()
        {
            foreach (var r in _registrations) r.Dispose();
        }
    }

    /// <summary>
    /// Call first thing in Main. A process inherits an ignored SIGINT from whoever started it, and a shell without
    /// job control (every script) starts its background jobs (`coordinator run ... &amp;`) with SIGINT ignored.
    /// .NET deliberately keeps an inherited ignore: it then installs no handler at all, so neither
    /// Console.CancelKeyPress nor a SIGINT <see cref="PosixSignalRegistration"/> ever sees `kill -INT`, and training
    /// went on. This sets SIGINT back to the default before .NET's signal handling starts (it starts lazily, with the
    /// first Console, Process or PosixSignalRegistration use), so the registrations above receive it. The cost: a
    /// coordinator started in the background of a script now also stops (cleanly) on a Ctrl+C meant for the script.
    /// Does nothing on Windows or when SIGINT is not ignored.
    /// </summary>
    public static void StopIgnoringInterrupt()
    {
        if (OperatingSystem.IsWindows()) return;
        // struct sigaction: its first member is the handler on Linux (glibc, musl) and macOS; 256 bytes cover the
        // whole struct everywhere (152 on Linux x64). A zeroed struct is SIG_DFL with no flags and an empty mask.
        var current = Marshal.AllocHGlobal(256);
        var defaults = Marshal.AllocHGlobal(256);
        try
        {
            Clear(current);
            Clear(defaults);
            if (sigaction(SigInt, IntPtr.Zero, current) != 0) return;
            if (Marshal.ReadIntPtr(current) == SigIgn) _ = sigaction(SigInt, defaults, IntPtr.Zero);   // on failure it stays ignored, as before
        }
        finally
        {
            Marshal.FreeHGlobal(current);
            Marshal.FreeHGlobal(defaults);
        }
    }

    private const int SigInt = 2;   // the same on Linux and macOS
    private static readonly IntPtr SigIgn = 1;

    private static void Clear(IntPtr p)
    {
        for (var i = 0; i < 256; i += 8) Marshal.WriteInt64(p, i, 0);
    }

    // "libc" is mapped by the runtime to the platform's C library (libc.so.6 on glibc, libSystem on macOS).
    [DllImport("libc", EntryPoint = "sigaction")]
    private static extern int sigaction(int signal, IntPtr action, IntPtr oldAction);
}
