using System.Globalization;
using System.Runtime.InteropServices;

namespace DistDiffusion.Worker;

/// <summary>
/// Which CPUs a worker's threads may run on (--cpu-affinity), in the CPU list syntax of taskset -c and cpusets ("1",
/// "0-3,8"). `coordinator run` gives each worker CPUs of its own when they fit. Unpinned, two workers woken one after the
/// other could land on the same core's run queue while the other core ran the coordinator: in SCHED_BATCH the second
/// waited for the first's time slice to end before the kernel moved it, and `benchmark-timeline`'s raw marks showed one
/// step in four to ten starting a worker 2-4 ms late (perf sched: the other core meanwhile idle or running the coordinator).
/// Elsewhere than Linux this does nothing.
/// </summary>
public static class CpuAffinity
{
    private const int MaskBytes = 128;   // glibc's cpu_set_t: 1,024 CPUs

    [DllImport("libc", EntryPoint = "sched_getaffinity", SetLastError = true)]
    private static extern int GetAffinity(int pid, nint size, byte[] mask);

    [DllImport("libc", EntryPoint = "sched_setaffinity", SetLastError = true)]
    private static extern int SetAffinity(int pid, nint size, byte[] mask);

    /// <summary>The CPUs this process may run on (its affinity, which a cpuset or taskset may have narrowed), in order.</summary>
    public static IReadOnlyList<int> Allowed()
    {
        if (!OperatingSystem.IsLinux()) return [.. Enumerable.Range(0, Environment.ProcessorCount)];
        var mask = new byte[MaskBytes];
        if (GetAffinity(0, MaskBytes, mask) != 0)
            throw new InvalidOperationException($"sched_getaffinity failed: {Marshal.GetPInvokeErrorMessage(Marshal.GetLastPInvokeError())}");
        return [.. Enumerable.Range(0, MaskBytes * 8).Where(c => (mask[c / 8] & (1 << (c % 8))) != 0)];
    }

    /// <summary>Parses a CPU list ("1", "0-3,8"): the CPUs in ascending order, or an error naming <paramref name="flag"/> and the value.</summary>
    public static IReadOnlyList<int> Parse(string list, string flag)
    {
        var cpus = new SortedSet<int>();
        foreach (var part in list.Split(',', StringSplitOptions.TrimEntries))
        {
            var ends = part.Split('-', StringSplitOptions.TrimEntries);
            if (ends.Length is < 1 or > 2 || !ends.All(e => int.TryParse(e, NumberStyles.None, CultureInfo.InvariantCulture, out var c) && c < MaskBytes * 8))
                throw new ArgumentException($"{flag} {list}: '{part}' is not a CPU number (0-{MaskBytes * 8 - 1}) or a range of them; expected e.g. 1 or 0-3,8");
            var first = int.Parse(ends[0], CultureInfo.InvariantCulture);
            var last = int.Parse(ends[^1], CultureInfo.InvariantCulture);
            if (last < first) throw new ArgumentException($"{flag} {list}: range '{part}' ends before it starts");
            for (var c = first; c <= last; c++) cpus.Add(c);
        }
        return [.. cpus];
    }

    /// <summary>A CPU list in the short form ("0-3,8").</summary>
    public static string Format(IEnumerable<int> cpus)
    {
        var sorted = cpus.Distinct().Order().ToList();
        var parts = new List<string>();
        for (var i = 0; i < sorted.Count;)
        {
            var j = i;
            while (j + 1 < sorted.Count && sorted[j + 1] == sorted[j] + 1) j++;
            parts.Add(j == i ? sorted[i].ToString(CultureInfo.InvariantCulture) : string.Create(CultureInfo.InvariantCulture, $"{sorted[i]}-{sorted[j]}"));
            i = j + 1;
        }
        return string.Join(',', parts);
    }

    /// <summary>
    /// CPUs of their own for <paramref name="workers"/> workers of <paramref name="threads"/> threads each: consecutive
    /// blocks of <paramref name="allowed"/> when the workers' threads fill them exactly (`run`'s default, the cores divided
    /// among the workers); otherwise null, and the kernel places them: more threads than CPUs cannot be pinned one to a
    /// CPU, and a run that leaves CPUs free may share the machine with other work (another run would be pinned onto the
    /// same first CPUs while the rest stayed idle).
    /// </summary>
    public static IReadOnlyList<int>[]? Blocks(IReadOnlyList<int> allowed, int workers, int threads)
    {
        if (workers < 1 || threads < 1 || (long)workers * threads != allowed.Count) return null;
        return [.. Enumerable.Range(0, workers).Select(w => (IReadOnlyList<int>)[.. allowed.Skip(w * threads).Take(threads)])];
    }

    /// <summary>Throws, naming <paramref name="flag"/>, unless every CPU in <paramref name="cpus"/> is one this process may use.</summary>
    public static void CheckAllowed(IReadOnlyList<int> cpus, string flag)
    {
        if (!OperatingSystem.IsLinux() || cpus.Count == 0) return;
        var allowed = Allowed();
        if (cpus.FirstOrDefault(c => !allowed.Contains(c), -1) is var missing and >= 0)
            throw new ArgumentException($"{flag} {Format(cpus)}: CPU {missing} is not one this process may use ({Format(allowed)})");
    }

    /// <summary>
    /// Restricts every thread of this process to <paramref name="cpus"/> (checked by <see cref="CheckAllowed"/> first);
    /// threads started afterwards inherit it from their creator. Returns the number of threads moved.
    /// </summary>
    public static int Apply(IReadOnlyList<int> cpus, string flag)
    {
        if (!OperatingSystem.IsLinux() || cpus.Count == 0) return 0;
        CheckAllowed(cpus, flag);
        var mask = new byte[MaskBytes];
        foreach (var c in cpus) mask[c / 8] |= (byte)(1 << (c % 8));
        return ThreadTable.ForEachOfThisProcess(tid =>
        {
            if (SetAffinity(tid, MaskBytes, mask) == 0) return true;
            var error = Marshal.GetLastPInvokeError();
            if (error == 3) return false;   // ESRCH: the thread ended meanwhile
            throw new InvalidOperationException($"sched_setaffinity(thread {tid}, {Format(cpus)}) failed: {Marshal.GetPInvokeErrorMessage(error)}");
        });
    }

    /// <summary>The CPUs a thread may run on as the kernel reports them (/proc/PID/task/TID/status), or null if unreadable.</summary>
    public static IReadOnlyList<int>? Of(int pid, int tid) =>
        ThreadTable.Field(pid, tid, "status", "Cpus_allowed_list") is { } list ? Parse(list, "Cpus_allowed_list") : null;
}
