namespace DistDiffusion.Tests.Data;

/// <summary>Paths of the committed MNIST files copied next to the test binaries.</summary>
internal static class TestFiles
{
    public static string MnistFolder => Path.Combine(AppContext.BaseDirectory, "data", "mnist");

    public static string T10kImages => Path.Combine(MnistFolder, "t10k-images-idx3-ubyte.gz");

    public static string T10kLabels => Path.Combine(MnistFolder, "t10k-labels-idx1-ubyte.gz");
}
