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
        using var tmp = new TestFiles.TempFolder();
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
        using var tmp = new TestFiles.TempFolder();
        WriteBands(tmp.File("good.png"));
        var bad = tmp.File("broken.png");
        File.WriteAllBytes(bad, [0x89, (byte)'P', (byte)'N', (byte)'G', 1, 2, 3, 4, 5]);
        var e = Assert.Throws<InvalidDataException>(() => ImageFolderReader.Load(tmp.Path, 8));
        Assert.Contains(bad, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void EmptyOrMissingFolderIsRejected()
    {
        using var tmp = new TestFiles.TempFolder();
        var e = Assert.Throws<FileNotFoundException>(() => ImageFolderReader.Load(tmp.Path, 8));
        Assert.Contains(tmp.Path, e.Message, StringComparison.Ordinal);
        Assert.Throws<DirectoryNotFoundException>(() => ImageFolderReader.Load(tmp.File("missing"), 8));
    }
}
