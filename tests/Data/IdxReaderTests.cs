using System.Buffers.Binary;
using System.IO.Compression;
using DistDiffusion.Model.Data;

namespace DistDiffusion.Tests.Data;

public class IdxReaderTests
{
    internal static byte[] Idx(int magic, int[] dims, int payloadBytes, byte fill = 0)
    {
        var b = new byte[4 + 4 * dims.Length + payloadBytes];
        BinaryPrimitives.WriteInt32BigEndian(b, magic);
        for (var i = 0; i < dims.Length; i++) BinaryPrimitives.WriteInt32BigEndian(b.AsSpan(4 + 4 * i), dims[i]);
        for (var i = 4 + 4 * dims.Length; i < b.Length; i++) b[i] = (byte)(fill + i);
        return b;
    }

    internal static byte[] Gzip(byte[] raw)
    {
        using var ms = new MemoryStream();
        using (var gz = new GZipStream(ms, CompressionLevel.Fastest, leaveOpen: true)) gz.Write(raw);
        return ms.ToArray();
    }

    [Fact]
    public void ReadsRawAndGzipSmallFilesAndScalesToMinusOneOne()
    {
        using var tmp = new TempFolder();
        var raw = Idx(2051, [2, 2, 3], 12);
        raw[16] = 0; raw[17] = 255; raw[18] = 51;
        File.WriteAllBytes(tmp.File("a-idx3-ubyte"), raw);
        File.WriteAllBytes(tmp.File("b.gz"), Gzip(raw));
        foreach (var name in new[] { "a-idx3-ubyte", "b.gz" })
        {
            using var x = IdxReader.ReadImages(tmp.File(name));
            Assert.Equal([2L, 1, 2, 3], x.shape);
            var v = x.flatten().data<float>().ToArray();
            Assert.Equal(-1f, v[0]);
            Assert.Equal(1f, v[1]);
            Assert.Equal(51 / 127.5f - 1f, v[2], 6);
        }
        File.WriteAllBytes(tmp.File("l"), Idx(2049, [3], 0).Concat(new byte[] { 9, 0, 4 }).ToArray());
        using var y = IdxReader.ReadLabels(tmp.File("l"));
        Assert.Equal([9L, 0, 4], y.data<long>().ToArray());
    }

    [Fact]
    public void BadMagicIsRejectedNamingFileAndNumbers()
    {
        using var tmp = new TempFolder();
        var p = tmp.File("images-bad-magic");
        File.WriteAllBytes(p, Idx(2049, [1, 2, 2], 4));
        var e = Assert.Throws<InvalidDataException>(() => IdxReader.ReadImages(p));
        Assert.Contains(p, e.Message, StringComparison.Ordinal);
        Assert.Contains("magic", e.Message, StringComparison.Ordinal);
        Assert.Contains("expected 2051", e.Message, StringComparison.Ordinal);
        Assert.Contains("got 2049", e.Message, StringComparison.Ordinal);

        var q = tmp.File("labels-bad-magic");
        File.WriteAllBytes(q, Idx(2051, [1], 1));
        var e2 = Assert.Throws<InvalidDataException>(() => IdxReader.ReadLabels(q));
        Assert.Contains("expected 2049", e2.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void TruncatedPixelsAreRejectedWithByteCounts()
    {
        using var tmp = new TempFolder();
        var p = tmp.File("truncated.gz");
        File.WriteAllBytes(p, Gzip(Idx(2051, [10, 28, 28], 7840 - 100)));
        var e = Assert.Throws<InvalidDataException>(() => IdxReader.ReadImages(p));
        Assert.Contains(p, e.Message, StringComparison.Ordinal);
        Assert.Contains("truncated", e.Message, StringComparison.Ordinal);
        Assert.Contains("expected 7840 bytes of pixel data", e.Message, StringComparison.Ordinal);
        Assert.Contains("got 7740", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void HeaderCountDisagreeingWithTheDataIsRejected()
    {
        using var tmp = new TempFolder();
        var p = tmp.File("extra");
        File.WriteAllBytes(p, Idx(2049, [5], 8));
        var e = Assert.Throws<InvalidDataException>(() => IdxReader.ReadLabels(p));
        Assert.Contains(p, e.Message, StringComparison.Ordinal);
        Assert.Contains("header count 5 disagrees", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void ZeroSizesAreRejected()
    {
        using var tmp = new TempFolder();
        var p = tmp.File("zero");
        File.WriteAllBytes(p, Idx(2051, [3, 0, 28], 0));
        var e = Assert.Throws<InvalidDataException>(() => IdxReader.ReadImages(p));
        Assert.Contains(p, e.Message, StringComparison.Ordinal);
        Assert.Contains("zero", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void GarbageWithGzNameAndCorruptGzipAreRejected()
    {
        using var tmp = new TempFolder();
        var p = tmp.File("train-images-idx3-ubyte.gz");
        File.WriteAllText(p, "<html>404 not found</html>");
        var e = Assert.Throws<InvalidDataException>(() => IdxReader.ReadImages(p));
        Assert.Contains(p, e.Message, StringComparison.Ordinal);
        Assert.Contains("not gzip", e.Message, StringComparison.Ordinal);

        var q = tmp.File("corrupt.gz");
        var gz = Gzip(Idx(2051, [10, 28, 28], 7840));
        for (var i = 20; i < gz.Length; i++) gz[i] ^= 0x5A;
        File.WriteAllBytes(q, gz);
        var e2 = Assert.Throws<InvalidDataException>(() => IdxReader.ReadImages(q));
        Assert.Contains(q, e2.Message, StringComparison.Ordinal);
        Assert.Contains("corrupt gzip", e2.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void ImagesAndLabelsCountMismatchIsRejectedByMnistFiles()
    {
        using var tmp = new TempFolder();
        File.WriteAllBytes(tmp.File("t10k-images-idx3-ubyte"), Idx(2051, [3, 2, 2], 12));
        File.WriteAllBytes(tmp.File("t10k-labels-idx1-ubyte.gz"), Gzip(Idx(2049, [4], 4)));
        var e = Assert.Throws<InvalidDataException>(() => MnistFiles.Load(tmp.Path, DatasetKind.Mnist));
        Assert.Contains("t10k-images-idx3-ubyte holds 3 images", e.Message, StringComparison.Ordinal);
        Assert.Contains("4 labels", e.Message, StringComparison.Ordinal);
        Assert.Contains(tmp.Path, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void TrainAndT10kAreConcatenatedTrainFirst()
    {
        using var tmp = new TempFolder();
        var train = Idx(2051, [2, 2, 2], 8);
        Array.Fill(train, (byte)255, 16, 8);
        File.WriteAllBytes(tmp.File("train-images-idx3-ubyte"), train);
        File.WriteAllBytes(tmp.File("train-labels-idx1-ubyte"), Idx(2049, [2], 0).Concat(new byte[] { 1, 2 }).ToArray());
        var test = Idx(2051, [1, 2, 2], 4);
        Array.Fill(test, (byte)0, 16, 4);
        File.WriteAllBytes(tmp.File("t10k-images-idx3-ubyte.gz"), Gzip(test));
        File.WriteAllBytes(tmp.File("t10k-labels-idx1-ubyte.gz"), Gzip(Idx(2049, [1], 0).Concat(new byte[] { 3 }).ToArray()));
        using var ds = MnistFiles.Load(tmp.Path, DatasetKind.Mnist);
        Assert.Equal(3, ds.Count);
        Assert.Equal([1L, 2, 3], ds.Labels!.data<long>().ToArray());
        Assert.Equal(1f, ds.Data[0].min().item<float>());
        Assert.Equal(-1f, ds.Data[2].max().item<float>());
    }

    /// <summary>A gzip whose header declares 2 images of 28x28 but whose data inflates to 64 MiB (about 64 KiB compressed).</summary>
    private static byte[] GzipBomb(byte[] header, long inflatedBytes)
    {
        using var ms = new MemoryStream();
        using (var gz = new GZipStream(ms, CompressionLevel.Fastest, leaveOpen: true))
        {
            gz.Write(header);
            var zeros = new byte[1 << 20];
            for (long done = 0; done < inflatedBytes; done += zeros.Length) gz.Write(zeros, 0, (int)Math.Min(zeros.Length, inflatedBytes - done));
        }
        return ms.ToArray();
    }

    [Theory]
    [InlineData("images")]
    [InlineData("labels")]
    public void GzipThatInflatesBeyondWhatItsHeaderDeclaresIsStoppedThere(string what)
    {
        using var tmp = new TempFolder();
        var p = tmp.File(what + "-bomb.gz");
        var (header, declared) = what == "images" ? (Idx(2051, [2, 28, 28], 0), 16 + 2 * 28 * 28) : (Idx(2049, [2], 0), 8 + 2);
        var bomb = GzipBomb(header, 64L << 20);
        Assert.True(bomb.Length < 1 << 20, $"the test's bomb is {bomb.Length} bytes compressed");
        File.WriteAllBytes(p, bomb);
        var e = Assert.Throws<InvalidDataException>(() => { using var t = what == "images" ? IdxReader.ReadImages(p) : IdxReader.ReadLabels(p); });
        Assert.Contains(p, e.Message, StringComparison.Ordinal);
        Assert.Contains($"inflates to more than the {declared} bytes its header declares", e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void AbsurdHeaderDimensionsAreRefusedBeforeAnyDataIsRead(bool gzip)
    {
        using var tmp = new TempFolder();
        var p = tmp.File(gzip ? "absurd.gz" : "absurd");
        // 1,000,000 images of 4,000 x 4,000 pixels: 1.6e13 bytes, and the file holds none of them.
        var header = Idx(2051, [1_000_000, 4_000, 4_000], 0);
        File.WriteAllBytes(p, gzip ? Gzip(header) : header);
        var e = Assert.Throws<InvalidDataException>(() => IdxReader.ReadImages(p));
        Assert.Contains(p, e.Message, StringComparison.Ordinal);
        Assert.Contains("1000000 images of 4000x4000", e.Message, StringComparison.Ordinal);
        Assert.Contains($"limit of {IdxReader.MaxDataBytes} bytes", e.Message, StringComparison.Ordinal);

        var side = tmp.File("wide");
        File.WriteAllBytes(side, Idx(2051, [1, 1, IdxReader.MaxImageSide + 1], IdxReader.MaxImageSide + 1));
        var e2 = Assert.Throws<InvalidDataException>(() => IdxReader.ReadImages(side));
        Assert.Contains($"1x{IdxReader.MaxImageSide + 1}", e2.Message, StringComparison.Ordinal);
        Assert.Contains($"at most {IdxReader.MaxImageSide} pixels a side", e2.Message, StringComparison.Ordinal);
    }
}
