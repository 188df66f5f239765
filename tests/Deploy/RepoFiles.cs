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
    public const string Kustomization = "kustomization.yaml";

    /// <summary>Every folder under deploy/k8s (itself included) holding a kustomization.yaml, relative to the repository, with its kind.</summary>
    public static IReadOnlyList<(string Dir, string Kind)> Kustomizations()
    {
        var folder = PathOf(ManifestFolder);
        return Directory.EnumerateFiles(folder, Kustomization, SearchOption.AllDirectories)
            .Select(f => (Dir: Path.GetRelativePath(Root, Path.GetDirectoryName(f)!).Replace(Path.DirectorySeparatorChar, '/'), Kind: KindOf(File.ReadAllText(f))))
            .OrderBy(k => k.Dir, StringComparer.Ordinal)
            .ToList();
    }

    private static string KindOf(string text) =>
        text.Split('\n').Select(l => l.Trim()).FirstOrDefault(l => l.StartsWith("kind:", StringComparison.Ordinal))?["kind:".Length..].Trim() ?? "(no kind)";
}

/// <summary>
/// A throw-away copy of deploy/k8s under a temporary root, with one textual change in one file, for renders that show a
/// check failing. Deleted on dispose.
/// </summary>
internal sealed class RepoCopy : IDisposable
{
    private RepoCopy(string root, string changed)
    {
        Root = root;
        Changed = changed;
    }

    /// <summary>The copy's root: deploy/k8s lies under it as in the repository.</summary>
    public string Root { get; }

    /// <summary>The changed file, relative to deploy/k8s.</summary>
    public string Changed { get; }

    public static RepoCopy WithChange(string file, string oldText, string newText)
    {
        var source = RepoFiles.PathOf(RepoFiles.ManifestFolder + "/" + file);
        if (!File.Exists(source)) throw new ArgumentException($"no file {RepoFiles.ManifestFolder}/{file}");
        var text = File.ReadAllText(source);
        if (!text.Contains(oldText, StringComparison.Ordinal)) throw new ArgumentException($"{RepoFiles.ManifestFolder}/{file} does not contain '{oldText}'");
        var root = Path.Combine(Path.GetTempPath(), "distdiffusion-k8s-" + Guid.NewGuid().ToString("N")[..12]);
        var from = RepoFiles.PathOf(RepoFiles.ManifestFolder);
        foreach (var f in Directory.EnumerateFiles(from, "*", SearchOption.AllDirectories))
        {
            var to = Path.Combine(root, RepoFiles.ManifestFolder, Path.GetRelativePath(from, f));
            Directory.CreateDirectory(Path.GetDirectoryName(to)!);
            File.Copy(f, to);
        }
        File.WriteAllText(Path.Combine(root, RepoFiles.ManifestFolder, file), text.Replace(oldText, newText, StringComparison.Ordinal));
        return new RepoCopy(root, file);
    }

    /// <summary>
    /// Whether a kustomization (relative to the repository) may read the changed file: a one-off Job's only when the file
    /// is its own or the images component; every other kustomization always (they share the base and the components).
    /// </summary>
    public bool Affects(string dir)
    {
        var jobs = RepoFiles.ManifestFolder + "/jobs/";
        if (!dir.StartsWith(jobs, StringComparison.Ordinal)) return true;
        return Changed.StartsWith(dir[(RepoFiles.ManifestFolder.Length + 1)..] + "/", StringComparison.Ordinal) || Changed.StartsWith("components/images/", StringComparison.Ordinal);
    }

    public void Dispose()
    {
        try
        {
            Directory.Delete(Root, recursive: true);
        }
        catch (IOException)
        {
            // a temporary folder left behind is harmless
        }
    }
}
