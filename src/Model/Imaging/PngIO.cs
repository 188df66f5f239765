using System.Runtime.InteropServices;
using SkiaSharp;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Imaging;

/// <summary>Shared helpers: tensor to managed floats, RGBA buffer or bitmap to PNG, atomic file writes.</summary>
internal static class PngIO
{
    /// <summary>A float32 copy of any tensor's values in C order (the caller's tensor is not disposed).</summary>
    public static float[] ToFloats(Tensor t)
    {
        using var scope = torch.NewDisposeScope();
        var c = t.detach().cpu().to_type(ScalarType.Float32).contiguous();
        return c.data<float>().ToArray();
    }

    /// <summary>Maps [-1, 1] to 0..255 (clamped; NaN becomes 0).</summary>
    public static byte ToByte(float v) =>
        float.IsNaN(v) ? (byte)0 : (byte)Math.Round(Math.Clamp((v + 1f) * 127.5f, 0f, 255f));

    public static void WriteRgba(string path, int width, int height, byte[] rgba) => WriteAtomically(path, EncodeRgba(width, height, rgba));

    /// <summary>An RGBA buffer [height, width, 4] as PNG file bytes.</summary>
    public static byte[] EncodeRgba(int width, int height, byte[] rgba)
    {
        if (rgba.Length != checked(width * height * 4))
            throw new ArgumentException($"RGBA buffer of {rgba.Length} bytes for a {width}x{height} image", nameof(rgba));
        using var bmp = new SKBitmap(new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Unpremul));
        if (bmp.RowBytes == width * 4)
        {
            Marshal.Copy(rgba, 0, bmp.GetPixels(), rgba.Length);
        }
        else
        {
            var dst = bmp.GetPixels();
            for (var y = 0; y < height; y++)
                Marshal.Copy(rgba, y * width * 4, dst + y * bmp.RowBytes, width * 4);
        }
        using var image = SKImage.FromBitmap(bmp);
        using var data = image.Encode(SKEncodedImageFormat.Png, 100)
            ?? throw new IOException($"PNG encoding of a {width}x{height} image failed");
        return data.ToArray();
    }

    public static void WriteBitmap(string path, SKBitmap bmp)
    {
        using var image = SKImage.FromBitmap(bmp);
        using var data = image.Encode(SKEncodedImageFormat.Png, 100)
            ?? throw new IOException($"PNG encoding of a {bmp.Width}x{bmp.Height} image for {path} failed");
        WriteAtomically(path, data.ToArray());
    }

    /// <summary>Writes to a temporary file next to <paramref name="path"/> and renames it over the target.</summary>
    public static void WriteAtomically(string path, ReadOnlySpan<byte> bytes)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        var full = Path.GetFullPath(path);
        var dir = Path.GetDirectoryName(full);
        if (!string.IsNullOrEmpty(dir)) Directory.CreateDirectory(dir);
        var temp = full + $".{Environment.ProcessId}.{Guid.NewGuid():N}.tmp";
        try
        {
            using (var fs = new FileStream(temp, FileMode.CreateNew, FileAccess.Write))
                fs.Write(bytes);
            File.Move(temp, full, overwrite: true);
        }
        finally
        {
            if (File.Exists(temp)) File.Delete(temp);
        }
    }
}
