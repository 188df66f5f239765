using System.Collections.Concurrent;
using System.Diagnostics;

namespace DistDiffusion.Tests.Deploy;

/// <summary>
/// Renders kustomizations with the real kustomize inside kubectl (`kubectl kustomize DIR`), as `kubectl apply -k DIR`
/// would build them. The tests that need it are skipped, with <see cref="SkipReason"/>, only when kubectl is not on
/// PATH; CI installs it.
/// </summary>
internal static class Kustomize
{
    private static readonly Lazy<string?> Path = new(Find);

    /// <summary>The kubectl on PATH, or null.</summary>
    public static string? Kubectl => Path.Value;

    public static string SkipReason =>
        "kubectl is not on PATH: these checks render deploy/k8s with `kubectl kustomize` (kubectl 1.29 or newer; CI installs it)";

    private static string? Find()
    {
        foreach (var dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(System.IO.Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries))
        {
            var candidate = System.IO.Path.Combine(dir, "kubectl");
            if (File.Exists(candidate)) return candidate;
        }
        return null;
    }

    /// <summary>Renders of the repository's own kustomizations: they do not change while the tests run.</summary>
    private static readonly ConcurrentDictionary<string, Rendered> RepoRenders = new(StringComparer.Ordinal);

    /// <summary>A render: the YAML stream, or the error kustomize reported.</summary>
    public sealed record Rendered(string? Yaml, string? Error);

    /// <summary>`kubectl kustomize DIR` with DIR relative to <paramref name="root"/> (a copy of the repository, or the repository).</summary>
    public static Rendered Render(string root, string dir)
    {
        if (root == RepoFiles.Root) return RepoRenders.GetOrAdd(dir, d => Run(root, d));
        return Run(root, dir);
    }

    private static Rendered Run(string root, string dir)
    {
        var kubectl = Kubectl ?? throw new InvalidOperationException(SkipReason);
        var start = new ProcessStartInfo(kubectl)
        {
            WorkingDirectory = root,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        start.ArgumentList.Add("kustomize");
        start.ArgumentList.Add(dir);
        using var process = Process.Start(start) ?? throw new InvalidOperationException($"could not start {kubectl}");
        var stdout = process.StandardOutput.ReadToEndAsync();
        var stderr = process.StandardError.ReadToEndAsync();
        if (!process.WaitForExit(TimeSpan.FromSeconds(120)))
        {
            process.Kill(entireProcessTree: true);
            return new Rendered(null, $"`kubectl kustomize {dir}` did not finish within 120 s");
        }
        process.WaitForExit();
        return process.ExitCode == 0
            ? new Rendered(stdout.Result, null)
            : new Rendered(null, $"`kubectl kustomize {dir}` failed (exit {process.ExitCode}): {stderr.Result.Trim()}");
    }
}

/// <summary>A fact that needs kubectl: skipped, with the reason, only when kubectl is not on PATH.</summary>
internal sealed class KustomizeFactAttribute : FactAttribute
{
    public KustomizeFactAttribute()
    {
        if (Kustomize.Kubectl is null) Skip = Kustomize.SkipReason;
    }
}

/// <summary>A theory that needs kubectl: skipped, with the reason, only when kubectl is not on PATH.</summary>
internal sealed class KustomizeTheoryAttribute : TheoryAttribute
{
    public KustomizeTheoryAttribute()
    {
        if (Kustomize.Kubectl is null) Skip = Kustomize.SkipReason;
    }
}
