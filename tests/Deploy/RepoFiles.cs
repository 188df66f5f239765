namespace DistDiffusion.Tests.Deploy;

/// <summary>The repository the tests were built from: found by walking up from the test binaries to DistDiffusion.sln.</summary>
internal static class RepoFiles
{
    private static readonly Lazy<string> RootPath = new(() =>
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "DistDiffusion.sln")))
                return dir.FullName;
        throw new InvalidOperationException($"no DistDiffusion.sln above {AppContext.BaseDirectory}: the deployment tests read the repository's files");
    });

    public static string Root => RootPath.Value;

    public static string PathOf(string relative) => Path.Combine(Root, relative.Replace('/', Path.DirectorySeparatorChar));

    public static string Read(string relative) => File.ReadAllText(PathOf(relative));

    public const string Dockerfile = "deploy/docker/Dockerfile";
    public const string DockerIgnore = ".dockerignore";
    public const string ManifestFolder = "deploy/k8s";
    public const string KubernetesDoc = "docs/kubernetes.md";

    /// <summary>Every manifest under deploy/k8s (jobs/ included), as (path relative to the repository, text), in name order.</summary>
    public static IReadOnlyList<(string Path, string Text)> Manifests()
    {
        var folder = PathOf(ManifestFolder);
        return Directory.EnumerateFiles(folder, "*.*", SearchOption.AllDirectories)
            .Where(f => f.EndsWith(".yaml", StringComparison.Ordinal) || f.EndsWith(".yml", StringComparison.Ordinal) || f.EndsWith(".json", StringComparison.Ordinal))
            .Select(f => (Path.GetRelativePath(Root, f).Replace(Path.DirectorySeparatorChar, '/'), File.ReadAllText(f)))
            .OrderBy(f => f.Item1, StringComparer.Ordinal)
            .ToList();
    }
}
