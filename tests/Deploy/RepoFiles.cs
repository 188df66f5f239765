namespace DistDiffusion.Tests.Deploy;

/// <summary>The deployment files of the repository the tests were built from (<see cref="Repository"/>).</summary>
internal static class RepoFiles
{
    public static string Root => Repository.Root;

    public static string PathOf(string relative) => Repository.PathOf(relative);

    public static string Read(string relative) => Repository.Read(relative);

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
