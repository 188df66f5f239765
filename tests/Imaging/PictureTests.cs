using DistDiffusion.Model.Data;
using DistDiffusion.Model.Imaging;
using DistDiffusion.Tests.Data;
using TorchSharp;

namespace DistDiffusion.Tests.Imaging;

public class PictureTests
{
    private static (byte R, byte G, byte B) Pixel((int Width, int Height, byte[] Rgba) img, int x, int y)
    {
        var o = (y * img.Width + x) * 4;
        return (img.Rgba[o], img.Rgba[o + 1], img.Rgba[o + 2]);
    }

    private static int DistinctColours(byte[] rgba)
    {
        var set = new HashSet<int>();
        for (var i = 0; i < rgba.Length; i += 4) set.Add(rgba[i] << 16 | rgba[i + 1] << 8 | rgba[i + 2]);
        return set.Count;
    }

    [Fact]
    public void MnistGridHasPaddingUpscalingAndTheDigits()
    {
        using var tmp = new TempFolder();
        using var x = IdxReader.ReadImages(TestFiles.T10kImages);
        using var first = x[..16];
        var path = tmp.File("sub/grid.png");
        ImageGrid.Save(first, path);
        var img = PngReader.Read(path);
        // 4 columns x 4 rows of 56 px (28 at 2x) with 2 px padding
        Assert.Equal(4 * 56 + 5 * 2, img.Width);
        Assert.Equal(4 * 56 + 5 * 2, img.Height);
        Assert.Equal((ImageGrid.PadGrey, ImageGrid.PadGrey, ImageGrid.PadGrey), Pixel(img, 0, 0));
        // every tile pixel is the (2x nearest) image value mapped to 0..255
        var v = first.data<float>().ToArray();
        for (var k = 0; k < 16; k += 5)
            for (var y = 0; y < 56; y += 3)
                for (var xx = 0; xx < 56; xx += 3)
                {
                    var expected = (byte)Math.Round((v[k * 784 + y / 2 * 28 + xx / 2] + 1) * 127.5);
                    var p = Pixel(img, 2 + k % 4 * 58 + xx, 2 + k / 4 * 58 + y);
                    Assert.Equal((expected, expected, expected), p);
                }
        Assert.True(DistinctColours(img.Rgba) > 50);
        Assert.Empty(Directory.GetFiles(Path.GetDirectoryName(path)!, "*.tmp"));
    }

    [Fact]
    public void RgbGridWithExplicitColumns()
    {
        using var tmp = new TempFolder();
        // 5 images 3x64x64: image i is pure red (channel 0 = 1, others -1)
        using var imgs = torch.full(new long[] { 5, 3, 64, 64 }, -1f);
        imgs[.., 0] = torch.tensor(1f);
        ImageGrid.Save(imgs, tmp.File("rgb.png"), columns: 2);
        var img = PngReader.Read(tmp.File("rgb.png"));
        Assert.Equal(2 * 64 + 3 * 2, img.Width);   // 64 px needs no upscaling
        Assert.Equal(3 * 64 + 4 * 2, img.Height);
        Assert.Equal(((byte)255, (byte)0, (byte)0), Pixel(img, 10, 10));
        // the 6th cell is empty padding colour
        Assert.Equal((ImageGrid.PadGrey, ImageGrid.PadGrey, ImageGrid.PadGrey), Pixel(img, 2 + 64 + 2 + 10, 2 + 2 * 66 + 10));
        Assert.Throws<ArgumentException>(() => ImageGrid.Save(torch.zeros(2, 2, 8, 8), tmp.File("bad.png")));
    }

    [Fact]
    public void ScatterDrawsReferenceUnderSamples()
    {
        using var tmp = new TempFolder();
        using var reference = Synthetic2D.SwissRoll(2000, 1);
        using var samples = Synthetic2D.SwissRoll(300, 2);
        var path = tmp.File("scatter.png");
        ScatterPlot.Save(samples, path, reference, "swiss roll");
        var img = PngReader.Read(path);
        Assert.Equal((512, 512), (img.Width, img.Height));
        int blue = 0, light = 0;
        for (var i = 0; i < img.Rgba.Length; i += 4)
        {
            var (r, g, b) = (img.Rgba[i], img.Rgba[i + 1], img.Rgba[i + 2]);
            if (b > 150 && r < 100) blue++;
            if (r == 200 && g == 200 && b == 200) light++;
        }
        Assert.True(blue > 300, $"sample pixels: {blue}");
        Assert.True(light > 1000, $"reference pixels: {light}");
        // axis range [-2, 2] for the swiss roll: the origin is the centre, on the axis lines
        var centre = Pixel(img, 256, 128);
        Assert.True(centre.R < 200, "vertical axis through the centre");

        ScatterPlot.Save(samples, tmp.File("small.png"), size: 128);
        Assert.Equal(128, PngReader.Read(tmp.File("small.png")).Width);
        Assert.Throws<ArgumentException>(() => ScatterPlot.Save(torch.zeros(3, 3), tmp.File("bad.png")));
    }

    [Fact]
    public void AxisRangeCoversDataAndRoundsUp()
    {
        Assert.Equal(2f, ScatterPlot.AxisLimit([[0.1f, -1.45f]], null));
        // samples far beyond the reference are capped at twice its extent
        Assert.Equal(3.5f, ScatterPlot.AxisLimit([[100f, 0f]], [1.5f, -1.5f]));
        Assert.Equal(1.5f, ScatterPlot.AxisLimit([[float.NaN, 0f]], null)); // no extent: 1 plus the 10 % margin, rounded up
    }

    [Fact]
    public void ImageTrajectoryHasOneRowPerSampleAndOneColumnPerFrame()
    {
        using var tmp = new TempFolder();
        var frames = Enumerable.Range(0, 3).Select(j => torch.full(new long[] { 2, 1, 8, 8 }, -1f + j)).ToList();
        TrajectoryStrip.Save(frames, tmp.File("traj.png"));
        var img = PngReader.Read(tmp.File("traj.png"));
        // 8x8 images are drawn at 7x (56 px)
        Assert.Equal(3 * 56 + 4 * 2, img.Width);
        Assert.Equal(2 * 56 + 3 * 2, img.Height);
        Assert.Equal(0, Pixel(img, 2 + 10, 2 + 10).R);
        Assert.Equal(128, Pixel(img, 2 + 58 + 10, 2 + 58 + 10).R);
        Assert.Equal(255, Pixel(img, 2 + 2 * 58 + 10, 2 + 58 + 10).R);
        foreach (var f in frames) f.Dispose();
    }

    [Fact]
    public void PointTrajectoryHasOnePanelPerFrame()
    {
        using var tmp = new TempFolder();
        using var x0 = Synthetic2D.Gaussians8(500, 3);
        using var noise = torch.randn(500, 2);
        var frames = new[] { noise, x0 * 0.5f + noise * 0.5f, x0 };
        TrajectoryStrip.Save(frames, tmp.File("traj2d.png"));
        var img = PngReader.Read(tmp.File("traj2d.png"));
        Assert.Equal((3 * TrajectoryStrip.PanelSize, TrajectoryStrip.PanelSize), (img.Width, img.Height));
        Assert.True(DistinctColours(img.Rgba) > 10);
        // each panel holds sample points
        for (var j = 0; j < 3; j++)
        {
            var blue = 0;
            for (var y = 0; y < 256; y++)
                for (var x = j * 256; x < (j + 1) * 256; x++)
                {
                    var p = Pixel(img, x, y);
                    if (p.B > 150 && p.R < 100) blue++;
                }
            Assert.True(blue > 50, $"panel {j}: {blue} sample pixels");
        }
        Assert.Throws<ArgumentException>(() => TrajectoryStrip.Save([x0, torch.zeros(3, 2)], tmp.File("bad.png")));
    }

    [Fact]
    public void PngReaderRejectsGarbage()
    {
        using var tmp = new TempFolder();
        File.WriteAllText(tmp.File("x.png"), "not a png");
        var e = Assert.Throws<InvalidDataException>(() => PngReader.Read(tmp.File("x.png")));
        Assert.Contains(tmp.File("x.png"), e.Message, StringComparison.Ordinal);
    }
}
