namespace DistDiffusion.Worker;

/// <summary>
/// The kernel's view of threads, for what is set or read per thread (/proc): the scheduling class
/// (<see cref="CpuScheduling"/>) and the CPUs a thread may use (<see cref="CpuAffinity"/>).
/// </summary>
public static class ThreadTable
{
    /// <summary>
    /// Calls <paramref name="apply"/> with the kernel id of every thread of this process (/proc/self/task) and returns how
    /// many it applied to: false means the thread ended meanwhile.
    /// </summary>
    public static int ForEachOfThisProcess(Func<int, bool> apply)
    {
        var applied = 0;
        foreach (var task in Directory.EnumerateDirectories("/proc/self/task"))
            if (int.TryParse(Path.GetFileName(task), out var tid) && apply(tid)) applied++;
        return applied;
    }

    /// <summary>
    /// The value after "<paramref name="key"/>:" in /proc/PID/task/TID/<paramref name="file"/> (e.g. sched's policy,
    /// status's Cpus_allowed_list), trimmed; null when the thread is gone, the file unreadable or the key absent.
    /// </summary>
    public static string? Field(int pid, int tid, string file, string key)
    {
        try
        {
            foreach (var line in File.ReadLines($"/proc/{pid}/task/{tid}/{file}"))
                if (line.StartsWith(key, StringComparison.Ordinal) && line[key.Length..].TrimStart().StartsWith(':'))
                    return line[(line.IndexOf(':') + 1)..].Trim();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // gone, or not readable
        }
        return null;
    }
}
