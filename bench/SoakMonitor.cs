using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;
using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;
using Grpc.Core;

namespace DistDiffusion.Bench;

/// <summary>One process of a soak: its role, RSS at the reference step, at the end and at its peak (bytes).</summary>
public sealed record ProcessMemory(string Role, int Pid, long AtReference, long AtEnd, long Peak)
{
    public long Growth => AtEnd - AtReference;
}

/// <summary>What a soak measured: steps, rate, and each process's memory.</summary>
public sealed record SoakResult(string Recipe, int Workers, long ReferenceStep, long EndStep, double StepsPerSecond, int ExitCode, IReadOnlyList<ProcessMemory> Processes, string Log)
{
    /// <summary>Largest growth of any process from the reference step to the end, in bytes per step.</summary>
    public double WorstGrowthPerStep => Processes.Count == 0 || EndStep <= ReferenceStep ? double.NaN
        : Processes.Max(p => p.Growth) / (double)(EndStep - ReferenceStep);
}

/// <summary>
/// Runs `coordinator run` as a real process tree (this executable, its worker children) and samples the resident memory
/// of every process against the training step (read from the run's own status RPC) until the run ends. Used by
/// `bench soak` and by the test that fails when per-step memory growth returns. Linux only (/proc).
/// </summary>
public static partial class SoakMonitor
{
    public static async Task<SoakResult> RunAsync(string recipe, int workers, long steps, long referenceStep, string outDir, IEnumerable<string> sets, CancellationToken ct, bool sharedMemory = true, TrainerTransport transport = TrainerTransport.Socket)
    {
        if (!OperatingSystem.IsLinux()) throw new PlatformNotSupportedException("the soak reads /proc: Linux only");
        if (referenceStep < 1 || referenceStep >= steps) throw new ArgumentException($"reference step {referenceStep}: expected 1..{steps - 1}");
        var args = BenchRuns.RunArguments(recipe, workers, steps, outDir, sharedMemory, transport, "information", sets);
        using var process = Process.Start(RunCommand.StartInfo("coordinator", args)) ?? throw new InvalidOperationException("could not start coordinator run");
        var log = new System.Text.StringBuilder();
        var address = new TaskCompletionSource<Uri>(TaskCreationOptions.RunContinuationsAsynchronously);
        void OnLine(string? line)
        {
            if (line is null) return;
            lock (log) log.AppendLine(line);
            if (AddressPattern().Match(line) is { Success: true } m) address.TrySetResult(new Uri(m.Groups[1].Value));
        }
        process.OutputDataReceived += (_, e) => OnLine(e.Data);
        process.ErrorDataReceived += (_, e) => OnLine(e.Data);
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        var samples = new List<(long Step, Dictionary<int, (string Role, long Rss)> Rss)>();
        var clock = new Stopwatch();
        long firstTimedStep = -1;
        try
        {
            var url = await address.Task.WaitAsync(TimeSpan.FromSeconds(120), ct);
            var tokenFile = Path.Combine(outDir, "token");
            using var channel = ClientChannel.Create(url);
            var client = new Coordination.CoordinationClient(channel);
            string? token = null;
            while (!process.HasExited)
            {
                ct.ThrowIfCancellationRequested();
                await Task.Delay(250, ct);
                if (token is null && File.Exists(tokenFile)) token = (await File.ReadAllTextAsync(tokenFile, ct)).Trim();
                if (token is null) continue;
                long step;
                try
                {
                    step = (long)(await client.GetStatusAsync(new GetStatusRequest(), Token.Headers(token), DateTime.UtcNow.AddSeconds(5), ct)).Step;
                }
                catch (RpcException)
                {
                    continue;   // starting or stopping
                }
                if (step >= 1 && firstTimedStep < 0)
                {
                    firstTimedStep = step;
                    clock.Start();
                }
                var rss = Tree(process.Id);
                if (rss.Count > 0) samples.Add((step, rss));
            }
            await process.WaitForExitAsync(ct);
        }
        finally
        {
            if (!process.HasExited) process.Kill(entireProcessTree: true);
        }
        clock.Stop();
        var end = samples.Count > 0 ? samples[^1].Step : 0;
        var reference = samples.FirstOrDefault(s => s.Step >= referenceStep);
        var processes = new List<ProcessMemory>();
        if (reference.Rss is not null)
            foreach (var (pid, (role, atReference)) in reference.Rss)
            {
                var seen = samples.Where(s => s.Rss.ContainsKey(pid)).ToList();
                processes.Add(new ProcessMemory(role, pid, atReference, seen[^1].Rss[pid].Rss, seen.Max(s => s.Rss[pid].Rss)));
            }
        var rate = firstTimedStep >= 0 && clock.Elapsed.TotalSeconds > 0 ? (end - firstTimedStep) / clock.Elapsed.TotalSeconds : double.NaN;
        string text;
        lock (log) text = log.ToString();
        return new SoakResult(recipe, workers, reference.Rss is null ? -1 : reference.Step, end, rate, process.ExitCode, processes, text);
    }

    /// <summary>RSS of a process and its children, by pid, with a role ("coordinator", "worker N").</summary>
    private static Dictionary<int, (string Role, long Rss)> Tree(int root)
    {
        var result = new Dictionary<int, (string, long)>();
        if (Rss(root) is not { } own) return result;
        result[root] = ("coordinator", own);
        var children = Children(root).Order().ToList();
        for (var i = 0; i < children.Count; i++)
            if (Rss(children[i]) is { } rss) result[children[i]] = ($"worker {i + 1}", rss);
        return result;
    }

    private static IEnumerable<int> Children(int pid)
    {
        var tasks = $"/proc/{pid}/task";
        if (!Directory.Exists(tasks)) yield break;
        foreach (var task in Directory.EnumerateDirectories(tasks))
        {
            string text;
            try { text = File.ReadAllText(Path.Combine(task, "children")); }
            catch (IOException) { continue; }
            foreach (var child in text.Split(' ', StringSplitOptions.RemoveEmptyEntries))
                yield return int.Parse(child, CultureInfo.InvariantCulture);
        }
    }

    private static long? Rss(int pid)
    {
        try
        {
            foreach (var line in File.ReadLines($"/proc/{pid}/status"))
                if (line.StartsWith("VmRSS:", StringComparison.Ordinal))
                    return long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1], CultureInfo.InvariantCulture) * 1024;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // the process just ended
        }
        return null;
    }

    [GeneratedRegex(@"coordinator (https?://[^\s,]+)")]
    private static partial Regex AddressPattern();
}
