using System.Runtime.InteropServices;
using SkiaSharp;

namespace DistDiffusion.Model.Imaging;

/// <summary>
/// Decodes a PNG (or anything SkiaSharp reads) to non-premultiplied RGBA bytes, row-major. An image whose header declares
/// more than <see cref="ImageLimits.MaxPixels"/> pixels, or a side over <see cref="ImageLimits.MaxSide"/>,
/// is refused with an <see cref="InvalidDataException"/> before it is decoded.
/// </summary>
public static class PngReader
{
    public static (int Width, int Height, byte[] Rgba) Read(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        if (!File.Exists(path)) throw new FileNotFoundException($"image {path} does not exist", path);
        using var codec = SKCodec.Create(path) ?? throw new InvalidDataException($"image {path}: not a decodable image file");
        var info = new SKImageInfo(codec.Info.Width, codec.Info.Height, SKColorType.Rgba8888, SKAlphaType.Unpremul);
        // The codec has read only the header: refuse sizes that would need gigabytes to decode, as the image-folder reader does.
        ImageLimits.CheckDeclared(path, info.Width, info.Height);
        using var bmp = SKBitmap.Decode(codec, info) ?? throw new InvalidDataException($"image {path}: decoding failed");
        var rgba = new byte[info.Width * info.Height * 4];
        var src = bmp.GetPixels();
        for (var y = 0; y < info.Height; y++)
            Marshal.Copy(src + y * bmp.RowBytes, rgba, y * info.Width * 4, info.Width * 4);
        return (info.Width, info.Height, rgba);
    }
}
