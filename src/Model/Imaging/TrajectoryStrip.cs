using SkiaSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Imaging;

/// <summary>
/// Pictures a denoising trajectory x_T ... x_0. Image frames [N, C, H, W]: a grid with one row per sample
/// and one column per frame (same padding and upscaling as <see cref="ImageGrid"/>). Point frames [N, 2]:
/// one 256 px scatter panel per frame, side by side, all with the same axis range.
/// </summary>
public static class TrajectoryStrip
{
    public const int PanelSize = 256;

    public static void Save(IReadOnlyList<Tensor> frames, string path)
    {
        ArgumentNullException.ThrowIfNull(frames);
        if (frames.Count == 0) throw new ArgumentException("expected at least one frame", nameof(frames));
        var first = frames[0];
        foreach (var f in frames)
            if (!f.shape.SequenceEqual(first.shape))
                throw new ArgumentException($"all frames must have the same shape: [{string.Join(", ", first.shape)}] vs [{string.Join(", ", f.shape)}]", nameof(frames));
        if (first.dim() == 4) SaveImages(frames, path);
        else if (first.dim() == 2 && first.shape[1] == 2) SavePoints(frames, path);
        else throw new ArgumentException($"expected frames [N, C, H, W] or [N, 2], got [{string.Join(", ", first.shape)}]", nameof(frames));
    }

    private static void SaveImages(IReadOnlyList<Tensor> frames, string path)
    {
        var (n, c, h, w) = ImageGrid.CheckImages(frames[0], nameof(frames));
        var values = frames.Select(PngIO.ToFloats).ToArray();
        var tiles = new List<(float[] Data, int Offset)>(n * frames.Count);
        for (var i = 0; i < n; i++)
            for (var j = 0; j < frames.Count; j++)
                tiles.Add((values[j], i * c * h * w));
        var (width, height, rgba) = ImageGrid.Compose(tiles, c, h, w, frames.Count, ImageGrid.UpscaleFor(h, w));
        PngIO.WriteRgba(path, width, height, rgba);
    }

    private static void SavePoints(IReadOnlyList<Tensor> frames, string path)
    {
        var values = frames.Select(PngIO.ToFloats).ToArray();
        var lim = ScatterPlot.AxisLimit(values, null);
        using var bmp = new SKBitmap(new SKImageInfo(PanelSize * frames.Count, PanelSize, SKColorType.Rgba8888, SKAlphaType.Premul));
        using (var canvas = new SKCanvas(bmp))
        {
            canvas.Clear(SKColors.White);
            for (var j = 0; j < frames.Count; j++)
            {
                var label = j == 0 ? "x_T" : j == frames.Count - 1 ? "x_0" : $"frame {j}";
                ScatterPlot.DrawPanel(canvas, new SKRect(j * PanelSize, 0, (j + 1) * PanelSize, PanelSize), values[j], null, lim, label);
            }
        }
        PngIO.WriteBitmap(path, bmp);
    }
}
