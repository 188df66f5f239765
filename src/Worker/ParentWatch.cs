using System.Diagnostics;
using System.Runtime.InteropServices;

namespace DistDiffusion.Worker;

/// <summary>
/// `worker --exit-with-parent PID` (what `coordinator run` passes): notices within about half a second that the
/// process that started this worker is gone, however it ended (SIGKILL, a crash, the OOM killer), so that no
/// orphan worker keeps computing and reconnecting. <see cref="Gone"/> is cancelled then; the caller stops the host,
/// and should the host not have stopped <see cref="Grace"/> later, the process exits with code 1 regardless.
/// <para>On Unix the check is <c>getppid() != PID</c>: the kernel reparents a process's children (to init or a
/// subreaper) the moment the process exits, even while it is an unreaped zombie, and the new parent can never carry
/// the dead parent's id. A parent that died before this worker looked is seen on the first check. Elsewhere the
/// check is whether process PID still runs.</para>
/// <para>Why not <c>prctl(PR_SET_PDEATHSIG, SIGTERM)</c>, which would be immediate: Linux sends that signal when
/// the <em>thread</em> that forked the child exits, not the process. .NET's <c>Process.Start</c> forks on the thread
/// that calls it. `run` happens to call it on the main thread today, but after any <c>await</c> it would be a
/// thread-pool thread (the tests that call `run` in process already start workers from one), and the pool retires
/// idle threads within a minute: the worker would get SIGTERM while its
/// parent runs on, stop cleanly with exit code 0 — which `run` does not count as a failure — and the run would go on
/// one worker short. Telling such a signal apart (getppid() is unchanged, the child was only handed to another
/// thread) would need a handler of our own on top, and the poll below is still needed for the parent that died
/// before prctl ran. Polling a value the kernel keeps exact costs one system call every half second and has none of
/// these failure modes.</para>
/// </summary>
internal sealed class ParentWatch : IDisposable
{
    /// <summary>How often the parent is checked.</summary>
    public static readonly TimeSpan Interval = TimeSpan.FromMilliseconds(500);

    /// <summary>How long a worker whose parent is gone has to stop by itself before it exits anyway.</summary>
    public static readonly TimeSpan Grace = TimeSpan.FromSeconds(5);

    private readonly CancellationTokenSource _gone = new();
    private readonly ManualResetEventSlim _disposed = new();
    private readonly Thread _thread;
    private int _disposeCalled;

    private ParentWatch(int parent)
    {
        Parent = parent;
        // A thread of its own, not a timer: a timer's callback waits for a thread-pool thread, and the pool may be
        // busy with torch work for seconds.
        _thread = new Thread(Watch) { IsBackground = true, Name = "parent watch" };
    }

    /// <summary>The parent's process id.</summary>
    public int Parent { get; }

    /// <summary>Cancelled once the parent is gone.</summary>
    public CancellationToken Gone => _gone.Token;

    public bool IsGone => _gone.IsCancellationRequested;

    /// <summary>Checks the parent now (so a parent that is already gone is reported at once), then every <see cref="Interval"/>.</summary>
    public static ParentWatch Start(int parent)
    {
        var watch = new ParentWatch(parent);
        if (!watch.ParentAlive()) watch._gone.Cancel();
        watch._thread.Start();
        return watch;
    }

    /// <summary>Who the parent is now, for messages: the process id getppid() reports, or null where there is none.</summary>
    public static int? CurrentParent() => OperatingSystem.IsWindows() ? null : getppid();

    private void Watch()
    {
        while (!_gone.IsCancellationRequested)
        {
            if (_disposed.Wait(Interval)) return;
            if (!ParentAlive()) _gone.Cancel();
        }
        // The host is stopping; a process that is still here after the grace period (stuck in a long native call,
        // say) is of no use to anyone.
        if (!_disposed.Wait(Grace)) Environment.Exit(1);
    }

    private bool ParentAlive()
    {
        if (!OperatingSystem.IsWindows()) return getppid() == Parent;
        try
        {
            using var p = Process.GetProcessById(Parent);
            return !p.HasExited;
        }
        catch (ArgumentException)
        {
            return false;   // no such process
        }
        catch (InvalidOperationException)
        {
            return false;   // it exited while we looked
        }
    }

    public void Dispose()
    {
        // Once only: a second call would Set an event the first one disposed.
        if (Interlocked.Exchange(ref _disposeCalled, 1) != 0) return;
        _disposed.Set();
        // Should the thread still be busy (it never blocks for long), it keeps what it uses: it may yet wait on
        // _disposed and cancel _gone, so both are disposed only once it has ended.
        if (_thread.Join(TimeSpan.FromSeconds(1)))
        {
            _gone.Dispose();
            _disposed.Dispose();
        }
    }

    // "libc" is mapped by the runtime to the platform's C library (libc.so.6 on glibc, libSystem on macOS).
    [DllImport("libc", EntryPoint = "getppid")]
    private static extern int getppid();
}
