using static TorchSharp.torch;

namespace DistDiffusion.Model.Imaging;

/// <summary>
/// Saves a batch of images [N, C, H, W] in [-1, 1] (C = 1 grey or 3 RGB) as one PNG grid with 2 px padding.
/// Small images are enlarged by an integer factor (nearest neighbour) so their longer side is at least
/// 56 px: 28x28 digits and 32x32 images are drawn at 2x.
/// </summary>
public static class ImageGrid
{
    public const int Padding = 2;

    /// <summary>Background / padding grey level.</summary>
    internal const byte PadGrey = 48;

    /// <param name="columns">Images per row; 0 means ceil(sqrt(N)).</param>
    public static void Save(Tensor images, string path, int columns = 0) => PngIO.WriteAtomically(path, Encode(images, columns));

    /// <summary>The grid as PNG file bytes.</summary>
    public static byte[] Encode(Tensor images, int columns = 0)
    {
        ArgumentNullException.ThrowIfNull(images);
        var (n, c, h, w) = CheckImages(images, nameof(images));
        if (columns < 0) throw new ArgumentOutOfRangeException(nameof(columns), columns, "expected >= 0 (0: ceil(sqrt(N)))");
        if (columns == 0) columns = (int)Math.Ceiling(Math.Sqrt(n));
        columns = Math.Min(columns, n);
        var values = PngIO.ToFloats(images);
        var tiles = new List<(float[] Data, int Offset)>(n);
        for (var i = 0; i < n; i++) tiles.Add((values, i * c * h * w));
        var (width, height, rgba) = Compose(tiles, c, h, w, columns, UpscaleFor(h, w));
        return PngIO.EncodeRgba(width, height, rgba);
    }

    /// <summary>Integer enlargement so the longer side reaches at least 56 px.</summary>
    internal static int UpscaleFor(int h, int w) => Math.Max(1, (int)Math.Ceiling(56.0 / Math.Max(h, w)));

    internal static (int N, int C, int H, int W) CheckImages(Tensor images, string name)
    {
        if (images.dim() != 4)
            throw new ArgumentException($"expected images [N, C, H, W], got [{string.Join(", ", images.shape)}]", name);
        var s = images.shape;
        if (s[1] is not (1 or 3))
            throw new ArgumentException($"expected 1 or 3 channels, got {s[1]} (shape [{string.Join(", ", s)}])", name);
        if (s[0] < 1 || s[2] < 1 || s[3] < 1)
            throw new ArgumentException($"empty image batch [{string.Join(", ", s)}]", name);
        return ((int)s[0], (int)s[1], (int)s[2], (int)s[3]);
    }

    /// <summary>Lays tiles ([C, H, W] floats at an offset) out row-major on a grid; returns an RGBA buffer.</summary>
    internal static (int Width, int Height, byte[] Rgba) Compose(IReadOnlyList<(float[] Data, int Offset)> tiles, int c, int h, int w, int columns, int scale)
    {
        var rows = (tiles.Count + columns - 1) / columns;
        var th = h * scale;
        var tw = w * scale;
        var width = columns * tw + (columns + 1) * Padding;
        var height = rows * th + (rows + 1) * Padding;
        var rgba = new byte[checked(width * height * 4)];
        for (var i = 0; i < rgba.Length; i += 4)
        {
            rgba[i] = rgba[i + 1] = rgba[i + 2] = PadGrey;
            rgba[i + 3] = 255;
        }
        var plane = h * w;
        for (var k = 0; k < tiles.Count; k++)
        {
            var (data, offset) = tiles[k];
            var left = Padding + (k % columns) * (tw + Padding);
            var top = Padding + (k / columns) * (th + Padding);
            for (var y = 0; y < th; y++)
            {
                var sy = y / scale;
                var row = ((top + y) * width + left) * 4;
                for (var x = 0; x < tw; x++)
                {
                    var p = offset + sy * w + x / scale;
                    var o = row + x * 4;
                    if (c == 1)
                    {
                        rgba[o] = rgba[o + 1] = rgba[o + 2] = PngIO.ToByte(data[p]);
                    }
                    else
                    {
                        rgba[o] = PngIO.ToByte(data[p]);
                        rgba[o + 1] = PngIO.ToByte(data[p + plane]);
                        rgba[o + 2] = PngIO.ToByte(data[p + 2 * plane]);
                    }
                }
            }
        }
        return (width, height, rgba);
    }
}
