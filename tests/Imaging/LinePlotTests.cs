using DistDiffusion.Model.Imaging;

namespace DistDiffusion.Tests.Imaging;

public class LinePlotTests
{
    private static int BluePixels((int Width, int Height, byte[] Rgba) img, int x0, int x1)
    {
        var n = 0;
        for (var y = 0; y < img.Height; y++)
            for (var x = x0; x < x1; x++)
            {
                var o = (y * img.Width + x) * 4;
                if (img.Rgba[o + 2] > 150 && img.Rgba[o] < 100) n++;
            }
        return n;
    }

    [Fact]
    public void DrawsTheLineAcrossThePlotAndSkipsNonFinitePoints()
    {
        using var tmp = new TempFolder();
        var path = tmp.File("loss.png");
        var points = Enumerable.Range(1, 50).Select(i => ((double)i * 10, 1.0 / i)).Append((510.0, double.NaN)).ToList();
        LinePlot.Save(points, path, "loss", 320, 200);
        var img = PngReader.Read(path);
        Assert.Equal((320, 200), (img.Width, img.Height));
        // The line spans the x range: blue in the left and the right third of the picture.
        Assert.True(BluePixels(img, 60, 120) > 5, "no line in the left part");
        Assert.True(BluePixels(img, 220, 300) > 5, "no line in the right part");
        // The steep start is near the top left, the flat end near the bottom right.
        var topLeft = Enumerable.Range(0, 60).Any(y => Enumerable.Range(60, 15).Any(x => { var o = (y * 320 + x) * 4; return img.Rgba[o + 2] > 150 && img.Rgba[o] < 100; }));
        Assert.True(topLeft, "the first point (the largest value) is not near the top");
    }

    [Fact]
    public void AnEmptyHistoryGivesAFramedEmptyPlot()
    {
        using var tmp = new TempFolder();
        var path = tmp.File("loss.png");
        LinePlot.Save([], path);
        var img = PngReader.Read(path);
        Assert.Equal(0, BluePixels(img, 0, img.Width));
        Assert.Throws<ArgumentOutOfRangeException>(() => LinePlot.Save([], path, width: 10));
    }
}
