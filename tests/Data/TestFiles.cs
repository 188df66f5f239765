namespace DistDiffusion.Tests.Data;

/// <summary>Paths of the committed MNIST files copied next to the test binaries, and temp folders.</summary>
internal static class TestFiles
{
    public static string MnistFolder => Path.Combine(AppContext.BaseDirectory, "data", "mnist");

    public static string T10kImages => Path.Combine(MnistFolder, "t10k-images-idx3-ubyte.gz");

    public static string T10kLabels => Path.Combine(MnistFolder, "t10k-labels-idx1-ubyte.gz");

    /// <summary>A fresh empty folder under the temp directory, deleted on dispose.</summary>
    public sealed class TempFolder : IDisposable
    {
        public TempFolder()
        {
            Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "dd-tests-" + Guid.NewGuid().ToString("N"));
            Directory.CreateDirectory(Path);
        }

        public string Path { get; }

        public string File(string name) => System.IO.Path.Combine(Path, name);

        public void Dispose()
        {
            try { Directory.Delete(Path, recursive: true); } catch (IOException) { }
        }
    }
}
