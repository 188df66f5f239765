using System.Runtime.InteropServices;

namespace DistDiffusion.Worker;

/// <summary>The scheduling class a worker's threads run in (--cpu-scheduling).</summary>
public enum CpuSchedulingClass
{
    /// <summary>Linux's SCHED_BATCH (the default there): computation that does not preempt the running thread when it wakes.</summary>
    Batch,
    /// <summary>The default class (SCHED_OTHER), as the process started.</summary>
    Normal,
}

/// <summary>
/// Puts a worker's threads in Linux's SCHED_BATCH class (sched(7)): still fairly shared, but a thread that wakes does not
/// preempt the one running on its core; it waits for the next tick or a free core. Under `coordinator run` the workers
/// share the machine's cores with the coordinator, which wakes them one after another with their parameters: a worker
/// woken on the core of the coordinator's loop used to take that core while the loop still had the other workers'
/// messages to send, which `coordinator benchmark-timeline` showed as 1-3 ms tails in sending. Any process may move itself
/// into this class; elsewhere than Linux this does nothing.
/// </summary>
public static class CpuScheduling
{
    private const int SchedBatch = 3;

    [StructLayout(LayoutKind.Sequential)]
    private struct SchedParam
    {
        public int Priority;
    }

    [DllImport("libc", EntryPoint = "sched_setscheduler", SetLastError = true)]
    private static extern int SetScheduler(int pid, int policy, ref SchedParam param);

    /// <summary>
    /// Moves every thread of this process into <paramref name="choice"/>'s class; threads started afterwards inherit it from
    /// their creator. Returns the number of threads moved, or throws naming the thread and the error when one refuses.
    /// </summary>
    public static int Apply(CpuSchedulingClass choice)
    {
        if (choice == CpuSchedulingClass.Normal || !OperatingSystem.IsLinux()) return 0;
        return ThreadTable.ForEachOfThisProcess(UseBatch);
    }

    /// <summary>Moves one thread (by its kernel id) into SCHED_BATCH; false when it ended meanwhile.</summary>
    public static bool UseBatch(int tid)
    {
        var param = new SchedParam { Priority = 0 };
        if (SetScheduler(tid, SchedBatch, ref param) == 0) return true;
        var error = Marshal.GetLastPInvokeError();
        if (error == 3) return false;   // ESRCH: the thread is gone
        throw new InvalidOperationException($"sched_setscheduler(thread {tid}, SCHED_BATCH) failed: {Marshal.GetPInvokeErrorMessage(error)}");
    }

    /// <summary>A thread's scheduling policy as the kernel reports it (/proc/PID/task/TID/sched: 0 normal, 3 batch), or null if unreadable.</summary>
    public static int? PolicyOf(int pid, int tid) =>
        int.TryParse(ThreadTable.Field(pid, tid, "sched", "policy"), out var policy) ? policy : null;
}
