namespace DistDiffusion.Tests;

/// <summary>The repository the tests were built from: found by walking up from the test binaries to DistDiffusion.sln.</summary>
internal static class Repository
{
    private static readonly Lazy<string> RootPath = new(() =>
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(System.IO.Path.Combine(dir.FullName, "DistDiffusion.sln")))
                return dir.FullName;
        throw new InvalidOperationException($"no DistDiffusion.sln above {AppContext.BaseDirectory}: these tests read the repository's files");
    });

    public static string Root => RootPath.Value;

    /// <summary>A path given relative to the repository with '/' separators.</summary>
    public static string PathOf(string relative) => System.IO.Path.Combine(Root, relative.Replace('/', System.IO.Path.DirectorySeparatorChar));

    public static string Read(string relative) => File.ReadAllText(PathOf(relative));
}
