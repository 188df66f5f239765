using System.Security.Cryptography;
using DistDiffusion.Model.Data;
using TorchSharp;

namespace DistDiffusion.Tests.Data;

public class MnistTests
{
    [Fact]
    public void T10kImagesAreTheRealTestSet()
    {
        using var x = IdxReader.ReadImages(TestFiles.T10kImages);
        Assert.Equal([10000L, 1, 28, 28], x.shape);
        Assert.Equal(torch.ScalarType.Float32, x.dtype);
        Assert.Equal(-1f, x.min().item<float>());
        Assert.Equal(1f, x.max().item<float>());
        // MNIST digits are mostly background: mean pixel of the test set is 0.1325 (in [0, 1]).
        var mean01 = (x.mean().item<float>() + 1) / 2;
        Assert.InRange(mean01, 0.12f, 0.145f);
        // Corner pixels are always background.
        Assert.Equal(-1f, x[.., 0, 0, 0].max().item<float>());
    }

    [Fact]
    public void T10kLabelsAreTheRealTestSet()
    {
        using var y = IdxReader.ReadLabels(TestFiles.T10kLabels);
        Assert.Equal([10000L], y.shape);
        Assert.Equal(torch.ScalarType.Int64, y.dtype);
        // The first five test labels of MNIST are 7 2 1 0 4.
        Assert.Equal([7L, 2, 1, 0, 4], y[..5].data<long>().ToArray());
        using var counts = torch.bincount(y);
        var c = counts.data<long>().ToArray();
        Assert.Equal(10, c.Length);
        Assert.All(c, n => Assert.InRange(n, 850, 1150));
        Assert.Equal(1135L, c[1]); // the test set holds 1135 ones
    }

    [Fact]
    public void MnistFilesLoadsTheT10kFolderWithLabels()
    {
        using var ds = MnistFiles.Load(TestFiles.MnistFolder, DatasetKind.Mnist);
        Assert.Equal(10000, ds.Count);
        Assert.Equal([1L, 28, 28], ds.SampleShape);
        Assert.NotNull(ds.Labels);
        Assert.Equal(7L, ds.Labels![0].item<long>());
        Assert.StartsWith("MNIST", ds.Description, StringComparison.Ordinal);
        Assert.Contains("t10k 10000", ds.Description, StringComparison.Ordinal);
    }

    [Fact]
    public void FashionKindOnlyChangesTheDescription()
    {
        using var ds = MnistFiles.Load(TestFiles.MnistFolder, DatasetKind.FashionMnist);
        Assert.StartsWith("Fashion-MNIST", ds.Description, StringComparison.Ordinal);
        Assert.Throws<ArgumentException>(() => MnistFiles.Load(TestFiles.MnistFolder, DatasetKind.SwissRoll));
    }

    [Fact]
    public void CommittedFilesMatchSha256Sums()
    {
        var lines = File.ReadAllLines(Path.Combine(TestFiles.MnistFolder, "SHA256SUMS"))
            .Where(l => l.Length > 0).ToArray();
        Assert.Equal(2, lines.Length);
        foreach (var line in lines)
        {
            var parts = line.Split("  ", 2);
            var actual = Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(Path.Combine(TestFiles.MnistFolder, parts[1]))));
            Assert.Equal(parts[0], actual);
        }
    }

    [Fact]
    public async Task CommittedFilesMatchTheWellKnownMd5s()
    {
        // The committed .gz wrappers were re-made (2021 gzip timestamp), so their archive MD5 differs from
        // torchvision's; the decompressed bytes must be exactly the original release's.
        foreach (var name in new[] { "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz" })
        {
            var known = DatasetDownloader.MnistFiles.Single(f => f.Name == name);
            var path = Path.Combine(TestFiles.MnistFolder, name);
            var (_, content) = await DatasetDownloader.ChecksumsAsync(path);
            Assert.Equal(known.ContentMd5, content);
            Assert.True(await DatasetDownloader.HasGoodChecksumAsync(path, known));
        }
        Assert.Equal("9fb629c4189551a2d022fa330f9573f3", DatasetDownloader.MnistFiles.Single(f => f.Name == "t10k-images-idx3-ubyte.gz").ArchiveMd5);
        Assert.Equal("ec29112dd5afa0611ce80d1b7f02629c", DatasetDownloader.MnistFiles.Single(f => f.Name == "t10k-labels-idx1-ubyte.gz").ArchiveMd5);
    }

    [Fact]
    public void MissingFolderOrFilesNameTheFolderAndTheExpectedFiles()
    {
        using var tmp = new TempFolder();
        var missing = Path.Combine(tmp.Path, "nope");
        var e1 = Assert.Throws<DirectoryNotFoundException>(() => MnistFiles.Load(missing, DatasetKind.Mnist));
        Assert.Contains(missing, e1.Message, StringComparison.Ordinal);
        Assert.Contains("train-images-idx3-ubyte", e1.Message, StringComparison.Ordinal);

        var e2 = Assert.Throws<FileNotFoundException>(() => MnistFiles.Load(tmp.Path, DatasetKind.Mnist));
        Assert.Contains(tmp.Path, e2.Message, StringComparison.Ordinal);
        Assert.Contains("t10k-labels-idx1-ubyte", e2.Message, StringComparison.Ordinal);

        File.Copy(TestFiles.T10kImages, tmp.File("t10k-images-idx3-ubyte.gz"));
        var e3 = Assert.Throws<FileNotFoundException>(() => MnistFiles.Load(tmp.Path, DatasetKind.Mnist));
        Assert.Contains("t10k-labels-idx1-ubyte", e3.Message, StringComparison.Ordinal);
    }
}
