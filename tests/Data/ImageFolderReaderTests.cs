using DistDiffusion.Model;
using DistDiffusion.Model.Data;
using SkiaSharp;

namespace DistDiffusion.Tests.Data;

public class ImageFolderReaderTests
{
    /// <summary>A 60x30 PNG with three 20 px vertical bands: red, green, blue.</summary>
    private static void WriteBands(string path)
    {
        using var bmp = new SKBitmap(60, 30);
        using (var canvas = new SKCanvas(bmp))
        {
            using var paint = new SKPaint();
            paint.Color = SKColors.Red; canvas.DrawRect(0, 0, 20, 30, paint);
            paint.Color = new SKColor(0, 255, 0); canvas.DrawRect(20, 0, 20, 30, paint);
            paint.Color = SKColors.Blue; canvas.DrawRect(40, 0, 20, 30, paint);
        }
        using var data = bmp.Encode(SKEncodedImageFormat.Png, 100);
        File.WriteAllBytes(path, data.ToArray());
    }

    [Fact]
    public void ResizesShorterSideThenCentreCrops()
    {
        using var tmp = new TempFolder();
        WriteBands(tmp.File("b.png"));
        using (var grey = new SKBitmap(10, 40))
        {
            grey.Erase(new SKColor(255, 255, 255));
            using var d = grey.Encode(SKEncodedImageFormat.Png, 100);
            File.WriteAllBytes(tmp.File("a.png"), d.ToArray());
        }
        File.WriteAllText(tmp.File("notes.txt"), "ignored");
        using var ds = ImageFolderReader.Load(tmp.Path, 10);
        Assert.Equal(2, ds.Count);
        Assert.Equal([3L, 10, 10], ds.SampleShape);
        Assert.True(ds.Data.min().item<float>() >= -1f && ds.Data.max().item<float>() <= 1f);
        // a.png (sorted first) is white
        Assert.True(ds.Data[0].min().item<float>() > 0.95f);
        // b.png: 60x30 -> 20x10, crop x 5..14 of 20 = original x 15..45: red edge, green middle, blue edge
        var b = ds.Data[1];
        Assert.True(b[1, 5, 5].item<float>() > 0.9f && b[0, 5, 5].item<float>() < -0.9f && b[2, 5, 5].item<float>() < -0.9f);
        Assert.True(b[0, 5, 0].item<float>() > 0.2f, "left edge of the crop should be red");
        Assert.True(b[2, 5, 9].item<float>() > 0.2f, "right edge of the crop should be blue");

        using var g = ImageFolderReader.Load(tmp.Path, 10, channels: 1);
        Assert.Equal([1L, 10, 10], g.SampleShape);
        // luma of pure green = 0.587 -> 0.587 * 255 / 127.5 - 1 = 0.174
        Assert.InRange(g.Data[1, 0, 5, 5].item<float>(), 0.12f, 0.23f);
    }

    [Fact]
    public void CorruptFileIsNamed()
    {
        using var tmp = new TempFolder();
        WriteBands(tmp.File("good.png"));
        var bad = tmp.File("broken.png");
        File.WriteAllBytes(bad, [0x89, (byte)'P', (byte)'N', (byte)'G', 1, 2, 3, 4, 5]);
        var e = Assert.Throws<InvalidDataException>(() => ImageFolderReader.Load(tmp.Path, 8));
        Assert.Contains(bad, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void EmptyOrMissingFolderIsRejected()
    {
        using var tmp = new TempFolder();
        var e = Assert.Throws<FileNotFoundException>(() => ImageFolderReader.Load(tmp.Path, 8));
        Assert.Contains(tmp.Path, e.Message, StringComparison.Ordinal);
        Assert.Throws<DirectoryNotFoundException>(() => ImageFolderReader.Load(tmp.File("missing"), 8));
    }

    /// <summary>A PNG whose IHDR declares <paramref name="width"/> x <paramref name="height"/> RGB pixels, with one tiny IDAT: a few hundred bytes on disk.</summary>
    internal static byte[] PngDeclaring(int width, int height)
    {
        static void Chunk(MemoryStream png, string type, byte[] data)
        {
            var typed = System.Text.Encoding.ASCII.GetBytes(type).Concat(data).ToArray();
            var length = new byte[4];
            System.Buffers.Binary.BinaryPrimitives.WriteInt32BigEndian(length, data.Length);
            png.Write(length);
            png.Write(typed);
            var crc = new byte[4];
            System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(crc, System.IO.Hashing.Crc32.HashToUInt32(typed));
            png.Write(crc);
        }
        var ihdr = new byte[13];
        System.Buffers.Binary.BinaryPrimitives.WriteInt32BigEndian(ihdr, width);
        System.Buffers.Binary.BinaryPrimitives.WriteInt32BigEndian(ihdr.AsSpan(4), height);
        ihdr[8] = 8;   // bit depth
        ihdr[9] = 2;   // RGB
        using var idat = new MemoryStream();
        using (var z = new System.IO.Compression.ZLibStream(idat, System.IO.Compression.CompressionLevel.Fastest, leaveOpen: true))
            z.Write(new byte[1 + 3 * 64]);   // one filter byte and the first pixels of the first row
        using var png = new MemoryStream();
        png.Write([0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A]);
        Chunk(png, "IHDR", ihdr);
        Chunk(png, "IDAT", idat.ToArray());
        Chunk(png, "IEND", []);
        return png.ToArray();
    }

    [Fact]
    public void PngWhoseHeaderDeclaresHugeDimensionsIsRefusedBeforeDecoding()
    {
        using var tmp = new TempFolder();
        WriteBands(tmp.File("a-good.png"));
        var huge = tmp.File("b-huge.png");
        File.WriteAllBytes(huge, PngDeclaring(100_000, 100_000));
        var e = Assert.Throws<InvalidDataException>(() => ImageFolderReader.Load(tmp.Path, 8));
        Assert.Contains(huge, e.Message, StringComparison.Ordinal);
        Assert.Contains("100000x100000", e.Message, StringComparison.Ordinal);
        Assert.Contains($"at most {ImageLimits.MaxSide} pixels a side", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void JpegWhoseHeaderDeclaresTooManyPixelsIsRefusedBeforeDecoding()
    {
        using var tmp = new TempFolder();
        // A real 16x16 JPEG whose start-of-frame is patched to declare 10000 x 10000 (each side allowed, the area not).
        using var bmp = new SKBitmap(16, 16);
        bmp.Erase(SKColors.Gray);
        using var encoded = bmp.Encode(SKEncodedImageFormat.Jpeg, 90);
        var jpeg = encoded.ToArray();
        var sof = Enumerable.Range(0, jpeg.Length - 1).First(i => jpeg[i] == 0xFF && jpeg[i + 1] is 0xC0 or 0xC1 or 0xC2);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt16BigEndian(jpeg.AsSpan(sof + 5), 10_000);   // height
        System.Buffers.Binary.BinaryPrimitives.WriteUInt16BigEndian(jpeg.AsSpan(sof + 7), 10_000);   // width
        var huge = tmp.File("huge.jpg");
        File.WriteAllBytes(huge, jpeg);
        var e = Assert.Throws<InvalidDataException>(() => ImageFolderReader.Load(tmp.Path, 8));
        Assert.Contains(huge, e.Message, StringComparison.Ordinal);
        Assert.Contains("10000x10000", e.Message, StringComparison.Ordinal);
        Assert.Contains($"at most {ImageLimits.MaxPixels} pixels", e.Message, StringComparison.Ordinal);
    }
}
