using SkiaSharp;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Data;

/// <summary>
/// Loads a folder of PNG / JPEG images (top level only, sorted by file name, ordinal) with SkiaSharp:
/// each image is resized so its shorter side is <c>size</c> (high-quality filtering), centre-cropped to
/// size x size and scaled to [-1, 1]. Alpha is ignored. One channel = luma (0.299 R + 0.587 G + 0.114 B).
/// Image files are untrusted: dimensions are read from the header first, and an image over
/// <see cref="ImageLimits.MaxSide"/> pixels a side or <see cref="ImageLimits.MaxPixels"/> pixels is refused before it is decoded.
/// </summary>
public static class ImageFolderReader
{
    private static readonly string[] Extensions = [".png", ".jpg", ".jpeg"];

    public static Dataset Load(string folder, int size, int channels = 3)
    {
        ArgumentException.ThrowIfNullOrEmpty(folder);
        if (size < 1) throw new ArgumentOutOfRangeException(nameof(size), size, "expected an image side >= 1");
        if (channels is not (1 or 3)) throw new ArgumentOutOfRangeException(nameof(channels), channels, "expected 1 (grey) or 3 (RGB) channels");
        if (!Directory.Exists(folder))
            throw new DirectoryNotFoundException($"image folder {folder} does not exist");
        var files = Directory.EnumerateFiles(folder)
            .Where(f => Extensions.Contains(Path.GetExtension(f).ToLowerInvariant()))
            .Order(StringComparer.Ordinal)
            .ToArray();
        if (files.Length == 0)
            throw new FileNotFoundException($"image folder {folder} holds no .png, .jpg or .jpeg files", folder);

        var perImage = channels * size * size;
        var data = new float[checked((long)files.Length * perImage)];
        for (var i = 0; i < files.Length; i++)
            Decode(files[i], size, channels, data.AsSpan(i * perImage, perImage));
        var tensor = torch.tensor(data, [files.Length, channels, size, size], dtype: ScalarType.Float32);
        return new Dataset(tensor, $"image folder {folder} ({files.Length} images, {channels}x{size}x{size})");
    }

    /// <summary>Decodes one file into <paramref name="dest"/> ([C, size, size], values in [-1, 1]).</summary>
    internal static void Decode(string path, int size, int channels, Span<float> dest)
    {
        using var codec = SKCodec.Create(path)
            ?? throw new InvalidDataException($"image {path}: not a decodable PNG or JPEG file");
        var info = new SKImageInfo(codec.Info.Width, codec.Info.Height, SKColorType.Rgba8888, SKAlphaType.Unpremul);
        // The codec has read only the header so far: refuse sizes that would need gigabytes to decode.
        ImageLimits.CheckDeclared(path, info.Width, info.Height);
        using var decoded = SKBitmap.Decode(codec, info)
            ?? throw new InvalidDataException($"image {path}: decoding failed (corrupt or truncated data)");

        var scale = (double)size / Math.Min(info.Width, info.Height);
        var w = Math.Max(size, (int)Math.Round(info.Width * scale));
        var h = Math.Max(size, (int)Math.Round(info.Height * scale));
        using var resized = (w == info.Width && h == info.Height)
            ? decoded.Copy()
            : decoded.Resize(new SKImageInfo(w, h, SKColorType.Rgba8888, SKAlphaType.Unpremul), SKFilterQuality.High);
        if (resized is null)
            throw new InvalidDataException($"image {path}: resizing {info.Width}x{info.Height} to {w}x{h} failed");

        var x0 = (w - size) / 2;
        var y0 = (h - size) / 2;
        var pixels = resized.GetPixelSpan();
        var stride = resized.RowBytes;
        var plane = size * size;
        for (var y = 0; y < size; y++)
        {
            for (var x = 0; x < size; x++)
            {
                var o = (y + y0) * stride + (x + x0) * 4;
                float r = pixels[o], g = pixels[o + 1], b = pixels[o + 2];
                var p = y * size + x;
                if (channels == 1)
                {
                    dest[p] = (0.299f * r + 0.587f * g + 0.114f * b) / 127.5f - 1f;
                }
                else
                {
                    dest[p] = r / 127.5f - 1f;
                    dest[plane + p] = g / 127.5f - 1f;
                    dest[2 * plane + p] = b / 127.5f - 1f;
                }
            }
        }
    }
}
