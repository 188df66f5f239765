namespace DistDiffusion.Model;

/// <summary>
/// The size an image file may declare, checked from its header before anything is decoded (image files are untrusted:
/// a 100-byte PNG can declare 40000 x 40000 pixels). The image-folder reader and the PNG reader both apply it.
/// </summary>
public static class ImageLimits
{
    /// <summary>Widest and tallest image accepted.</summary>
    public const int MaxSide = 16_384;

    /// <summary>Most pixels one image may have (8192 x 8192: a 256 MiB RGBA buffer while it is decoded).</summary>
    public const long MaxPixels = 8192L * 8192;

    /// <summary>Refuses a declared size of zero, or over <see cref="MaxSide"/> a side or <see cref="MaxPixels"/> in all, naming the file.</summary>
    public static void CheckDeclared(string path, int width, int height)
    {
        if (width <= 0 || height <= 0)
            throw new InvalidDataException($"image {path}: has zero size ({width}x{height})");
        if (width > MaxSide || height > MaxSide)
            throw new InvalidDataException($"image {path}: its header declares {width}x{height} pixels; expected at most {MaxSide} pixels a side");
        if ((long)width * height > MaxPixels)
            throw new InvalidDataException($"image {path}: its header declares {width}x{height} pixels; expected at most {MaxPixels} pixels (8192x8192)");
    }
}
