using System.Runtime.InteropServices;
using DistDiffusion.Model.Data;
using SkiaSharp;

namespace DistDiffusion.Model.Imaging;

/// <summary>
/// Decodes a PNG (or anything SkiaSharp reads) to non-premultiplied RGBA bytes, row-major. An image whose header declares
/// more than <see cref="ImageFolderReader.MaxImagePixels"/> pixels, or a side over <see cref="ImageFolderReader.MaxImageSide"/>,
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
        if (info.Width <= 0 || info.Height <= 0)
            throw new InvalidDataException($"image {path}: has zero size ({info.Width}x{info.Height})");
        if (info.Width > ImageFolderReader.MaxImageSide || info.Height > ImageFolderReader.MaxImageSide)
            throw new InvalidDataException($"image {path}: its header declares {info.Width}x{info.Height} pixels; expected at most {ImageFolderReader.MaxImageSide} pixels a side");
        if ((long)info.Width * info.Height > ImageFolderReader.MaxImagePixels)
            throw new InvalidDataException($"image {path}: its header declares {info.Width}x{info.Height} pixels; expected at most {ImageFolderReader.MaxImagePixels} pixels (8192x8192)");
        using var bmp = SKBitmap.Decode(codec, info) ?? throw new InvalidDataException($"image {path}: decoding failed");
        var rgba = new byte[info.Width * info.Height * 4];
        var src = bmp.GetPixels();
        for (var y = 0; y < info.Height; y++)
            Marshal.Copy(src + y * bmp.RowBytes, rgba, y * info.Width * 4, info.Width * 4);
        return (info.Width, info.Height, rgba);
    }
}
