using System.Runtime.InteropServices;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>
/// The signals that ask a long-running verb (`run`, `serve`, `train`) to stop cleanly: SIGINT (Ctrl+C, or
/// `kill -INT` from a script or supervisor), SIGQUIT (Ctrl+\) and SIGTERM (`kill`, Kubernetes). Each cancels the
/// verb's token; the verb then checkpoints its last completed step and exits (130).
/// </summary>
internal static class StopSignals
{
    /// <summary>Until disposed, the three signals cancel <paramref name="cts"/> instead of ending the process.</summary>
    public static IDisposable Register(CancellationTokenSource cts)
    {
        var registrations = new[] { PosixSignal.SIGINT, PosixSignal.SIGQUIT, PosixSignal.SIGTERM }
            .Select(s => PosixSignalRegistration.Create(s, c =>
            {
                c.Cancel = true;
                cts.Cancel();
            }))
            .ToList();
        return new All(registrations);
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

    private sealed class All(List<PosixSignalRegistration> registrations) : IDisposable
    {
        public void Dispose()
        {
            foreach (var r in registrations) r.Dispose();
        }
    }
}
