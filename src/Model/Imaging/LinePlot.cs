using SkiaSharp;

namespace DistDiffusion.Model.Imaging;

/// <summary>
/// A line plot of (x, y) points as a PNG (e.g. loss against step): a frame, light grid lines at 5 divisions, the line in
/// blue, the x and y ranges written at the corners when a font is available. Non-finite points are skipped; the y range
/// covers the finite values (with a 5 % margin).
/// </summary>
public static class LinePlot
{
    internal static readonly SKColor LineColor = new(31, 119, 180);

    public static void Save(IReadOnlyList<(double X, double Y)> points, string path, string? title = null, int width = 640, int height = 400)
    {
        ArgumentNullException.ThrowIfNull(points);
        if (width < 64 || height < 64) throw new ArgumentOutOfRangeException(nameof(width), $"{width}x{height}: expected sides of at least 64 px");
        var finite = points.Where(p => double.IsFinite(p.X) && double.IsFinite(p.Y)).ToList();
        using var bmp = new SKBitmap(new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Premul));
        using (var canvas = new SKCanvas(bmp))
        {
            canvas.Clear(SKColors.White);
            var margin = 40f;
            var plot = new SKRect(margin + 20, margin, width - margin / 2, height - margin);
            using var gridPaint = new SKPaint { Color = new SKColor(235, 235, 235), StrokeWidth = 1, Style = SKPaintStyle.Stroke };
            using var framePaint = new SKPaint { Color = new SKColor(60, 60, 60), StrokeWidth = 1, Style = SKPaintStyle.Stroke };
            for (var i = 1; i < 5; i++)
            {
                var x = plot.Left + plot.Width * i / 5f;
                var y = plot.Top + plot.Height * i / 5f;
                canvas.DrawLine(x, plot.Top, x, plot.Bottom, gridPaint);
                canvas.DrawLine(plot.Left, y, plot.Right, y, gridPaint);
            }
            if (finite.Count > 0)
            {
                var (x0, x1) = (finite.Min(p => p.X), finite.Max(p => p.X));
                var (y0, y1) = (finite.Min(p => p.Y), finite.Max(p => p.Y));
                if (x1 <= x0) (x0, x1) = (x0 - 0.5, x0 + 0.5);
                if (y1 <= y0) (y0, y1) = (y0 - 0.5, y0 + 0.5);
                var pad = (y1 - y0) * 0.05;
                (y0, y1) = (y0 - pad, y1 + pad);
                float X(double v) => plot.Left + (float)((v - x0) / (x1 - x0)) * plot.Width;
                float Y(double v) => plot.Bottom - (float)((v - y0) / (y1 - y0)) * plot.Height;
                using var linePaint = new SKPaint { Color = LineColor, StrokeWidth = 2, IsAntialias = true, Style = SKPaintStyle.Stroke, StrokeJoin = SKStrokeJoin.Round };
                using var path2 = new SKPath();
                path2.MoveTo(X(finite[0].X), Y(finite[0].Y));
                foreach (var p in finite.Skip(1)) path2.LineTo(X(p.X), Y(p.Y));
                if (finite.Count == 1) canvas.DrawCircle(X(finite[0].X), Y(finite[0].Y), 3, linePaint);
                else canvas.DrawPath(path2, linePaint);
                var size = 12f;
                ScatterPlot.DrawText(canvas, y1.ToString("G4", System.Globalization.CultureInfo.InvariantCulture), 4, plot.Top + size, size);
                ScatterPlot.DrawText(canvas, y0.ToString("G4", System.Globalization.CultureInfo.InvariantCulture), 4, plot.Bottom, size);
                ScatterPlot.DrawText(canvas, x0.ToString("G6", System.Globalization.CultureInfo.InvariantCulture), plot.Left, plot.Bottom + size * 1.4f, size);
                ScatterPlot.DrawText(canvas, x1.ToString("G6", System.Globalization.CultureInfo.InvariantCulture), plot.Right - size * 4, plot.Bottom + size * 1.4f, size);
            }
            canvas.DrawRect(plot, framePaint);
            if (!string.IsNullOrEmpty(title)) ScatterPlot.DrawText(canvas, title, plot.Left, margin * 0.7f, 14f);
        }
        PngIO.WriteBitmap(path, bmp);
    }
}
