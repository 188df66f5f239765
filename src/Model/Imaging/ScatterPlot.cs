using SkiaSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Imaging;

/// <summary>
/// Scatter plot of 2-D points [N, 2] as a square PNG: optional reference data drawn first in light grey, the
/// samples on top in blue, axes through the origin with ticks, a frame, and an optional title. The axis
/// range is symmetric, the same on both axes, and covers the reference (and the samples, unless they
/// stray beyond twice the reference's extent; points outside the range are not drawn). Without a
/// reference it covers the samples. The range is rounded up to a multiple of 0.5 with a 10 % margin,
/// e.g. [-2, 2] for the swiss roll.
/// </summary>
public static class ScatterPlot
{
    internal static readonly SKColor SampleColor = new(31, 119, 180, 220);
    internal static readonly SKColor ReferenceColor = new(200, 200, 200);

    public static void Save(Tensor samples, string path, Tensor? reference = null, string? title = null, int size = 512)
    {
        ArgumentNullException.ThrowIfNull(samples);
        CheckPoints(samples, nameof(samples));
        if (reference is not null) CheckPoints(reference, nameof(reference));
        if (size < 64) throw new ArgumentOutOfRangeException(nameof(size), size, "expected a side of at least 64 px");
        var s = PngIO.ToFloats(samples);
        var r = reference is null ? null : PngIO.ToFloats(reference);
        var lim = AxisLimit([s], r);
        using var bmp = new SKBitmap(new SKImageInfo(size, size, SKColorType.Rgba8888, SKAlphaType.Premul));
        using (var canvas = new SKCanvas(bmp))
        {
            canvas.Clear(SKColors.White);
            DrawPanel(canvas, new SKRect(0, 0, size, size), s, r, lim, title);
        }
        PngIO.WriteBitmap(path, bmp);
    }

    internal static void CheckPoints(Tensor t, string name)
    {
        if (t.dim() != 2 || t.shape[1] != 2)
            throw new ArgumentException($"expected points [N, 2], got [{string.Join(", ", t.shape)}]", name);
    }

    /// <summary>Largest finite |coordinate|.</summary>
    internal static float Extent(float[] xy)
    {
        var m = 0f;
        foreach (var v in xy)
            if (float.IsFinite(v)) m = Math.Max(m, Math.Abs(v));
        return m;
    }

    /// <summary>Half-width of the symmetric axis range (see the class summary).</summary>
    internal static float AxisLimit(IEnumerable<float[]> sampleSets, float[]? reference)
    {
        var sampleExt = sampleSets.Select(Extent).DefaultIfEmpty(0f).Max();
        float lim;
        if (reference is not null)
        {
            var refExt = Extent(reference);
            lim = refExt > 0 ? Math.Max(refExt, Math.Min(sampleExt, 2 * refExt)) : sampleExt;
        }
        else
        {
            lim = sampleExt;
        }
        if (!(lim > 0)) lim = 1f;
        return MathF.Ceiling(lim * 1.1f * 2f) / 2f;
    }

    /// <summary>Draws one scatter panel into <paramref name="area"/> of <paramref name="canvas"/>.</summary>
    internal static void DrawPanel(SKCanvas canvas, SKRect area, float[] samples, float[]? reference, float lim, string? title)
    {
        var side = Math.Min(area.Width, area.Height);
        var margin = MathF.Max(6f, side * 0.07f);
        var plot = new SKRect(area.Left + margin, area.Top + margin, area.Right - margin, area.Bottom - margin);
        float X(float v) => plot.MidX + v / lim * plot.Width / 2f;
        float Y(float v) => plot.MidY - v / lim * plot.Height / 2f;

        using var axisPaint = new SKPaint { Color = new SKColor(120, 120, 120), StrokeWidth = 1, IsAntialias = true, Style = SKPaintStyle.Stroke };
        using var gridPaint = new SKPaint { Color = new SKColor(235, 235, 235), StrokeWidth = 1, Style = SKPaintStyle.Stroke };
        using var framePaint = new SKPaint { Color = new SKColor(60, 60, 60), StrokeWidth = 1, Style = SKPaintStyle.Stroke };

        var step = lim <= 2 ? 0.5f : lim <= 5 ? 1f : MathF.Pow(10, MathF.Floor(MathF.Log10(lim)));
        for (var v = -MathF.Floor(lim / step) * step; v <= lim + 1e-4f; v += step)
        {
            if (Math.Abs(v) < 1e-6f) continue;
            canvas.DrawLine(X(v), plot.Top, X(v), plot.Bottom, gridPaint);
            canvas.DrawLine(plot.Left, Y(v), plot.Right, Y(v), gridPaint);
        }
        canvas.DrawLine(plot.Left, Y(0), plot.Right, Y(0), axisPaint);
        canvas.DrawLine(X(0), plot.Top, X(0), plot.Bottom, axisPaint);
        var tick = MathF.Max(2f, side * 0.008f);
        for (var v = -MathF.Floor(lim / step) * step; v <= lim + 1e-4f; v += step)
        {
            canvas.DrawLine(X(v), Y(0) - tick, X(v), Y(0) + tick, axisPaint);
            canvas.DrawLine(X(0) - tick, Y(v), X(0) + tick, Y(v), axisPaint);
        }

        var radius = MathF.Max(1f, side / 320f);
        canvas.Save();
        canvas.ClipRect(plot);
        if (reference is not null) DrawPoints(canvas, reference, ReferenceColor, radius, X, Y);
        DrawPoints(canvas, samples, SampleColor, radius, X, Y);
        canvas.Restore();
        canvas.DrawRect(plot, framePaint);

        var textSize = MathF.Max(9f, margin * 0.55f);
        DrawText(canvas, $"±{lim:0.##}", plot.Right - textSize * 3, plot.Bottom + textSize * 1.1f, textSize);
        if (!string.IsNullOrEmpty(title))
            DrawText(canvas, title, plot.Left, area.Top + margin * 0.75f, textSize);
    }

    private static void DrawPoints(SKCanvas canvas, float[] xy, SKColor color, float radius, Func<float, float> x, Func<float, float> y)
    {
        using var paint = new SKPaint { Color = color, StrokeWidth = 2 * radius, StrokeCap = SKStrokeCap.Round, IsAntialias = true, Style = SKPaintStyle.Stroke };
        var pts = new List<SKPoint>(xy.Length / 2);
        for (var i = 0; i + 1 < xy.Length; i += 2)
            if (float.IsFinite(xy[i]) && float.IsFinite(xy[i + 1]))
                pts.Add(new SKPoint(x(xy[i]), y(xy[i + 1])));
        canvas.DrawPoints(SKPointMode.Points, pts.ToArray(), paint);
    }

    /// <summary>Draws text when a font is available (the dependency-free Skia build may have none: then nothing is drawn).</summary>
    internal static void DrawText(SKCanvas canvas, string text, float x, float y, float size)
    {
        var typeface = SKTypeface.Default;
        if (typeface is null || typeface.GlyphCount == 0) return;
        using var font = new SKFont(typeface, size);
        using var paint = new SKPaint { Color = new SKColor(40, 40, 40), IsAntialias = true };
        canvas.DrawText(text, x, y, font, paint);
    }
}
