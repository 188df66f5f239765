using System.Buffers.Binary;
using System.IO.Compression;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Data;

/// <summary>
/// Reads the IDX files of MNIST-style datasets (LeCun et al.), gzip-compressed (detected by the
/// 1f 8b magic, whatever the file is called) or raw. Every format problem raises an
/// <see cref="InvalidDataException"/> whose message names the file and what is wrong.
/// </summary>
public static class IdxReader
{
    /// <summary>IDX3 magic: unsigned byte data, 3 dimensions.</summary>
    public const int ImagesMagic = 2051;

    /// <summary>IDX1 magic: unsigned byte data, 1 dimension.</summary>
    public const int LabelsMagic = 2049;

    /// <summary>Images as [N, 1, rows, cols] float32, pixel p in 0..255 mapped to p / 127.5 - 1 in [-1, 1].</summary>
    public static Tensor ReadImages(string path)
    {
        var bytes = ReadDecompressed(path, ImagesMagic);
        var (count, dims) = ParseHeader(path, bytes, ImagesMagic, 3, "images");
        var rows = dims[1];
        var cols = dims[2];
        var pixels = new float[checked(count * rows * cols)];
        var src = bytes.AsSpan(16);
        for (var i = 0; i < pixels.Length; i++)
            pixels[i] = src[i] / 127.5f - 1f;
        return torch.tensor(pixels, [count, 1, rows, cols], dtype: ScalarType.Float32);
    }

    /// <summary>Labels as [N] int64.</summary>
    public static Tensor ReadLabels(string path)
    {
        var bytes = ReadDecompressed(path, LabelsMagic);
        var (count, _) = ParseHeader(path, bytes, LabelsMagic, 1, "labels");
        var labels = new long[count];
        var src = bytes.AsSpan(8);
        for (var i = 0; i < labels.Length; i++)
            labels[i] = src[i];
        return torch.tensor(labels, [count], dtype: ScalarType.Int64);
    }

    private static byte[] ReadDecompressed(string path, int expectedMagic)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        if (!File.Exists(path))
            throw new FileNotFoundException($"IDX file {path} does not exist", path);
        var raw = File.ReadAllBytes(path);
        if (raw.Length >= 2 && raw[0] == 0x1f && raw[1] == 0x8b)
        {
            try
            {
                using var input = new MemoryStream(raw, writable: false);
                using var gz = new GZipStream(input, CompressionMode.Decompress);
                using var output = new MemoryStream(raw.Length * 4);
                gz.CopyTo(output);
                return output.ToArray();
            }
            catch (Exception e) when (e is InvalidDataException or EndOfStreamException or IOException)
            {
                throw new InvalidDataException($"IDX file {path}: corrupt gzip data ({e.Message})", e);
            }
        }
        if (path.EndsWith(".gz", StringComparison.OrdinalIgnoreCase) && (raw.Length < 4 || BinaryPrimitives.ReadInt32BigEndian(raw) != expectedMagic))
        {
            var first = raw.Length == 0 ? "an empty file" : "first bytes " + Convert.ToHexString(raw.AsSpan(0, Math.Min(4, raw.Length))).ToLowerInvariant();
            throw new InvalidDataException($"IDX file {path}: named .gz but is not gzip data (expected gzip magic 1f 8b, got {first}) nor a raw IDX file (expected magic {expectedMagic})");
        }
        return raw;
    }

    private static (long Count, long[] Dims) ParseHeader(string path, byte[] bytes, int expectedMagic, int ndim, string what)
    {
        var headerSize = 4 + 4 * ndim;
        if (bytes.Length < 4)
            throw new InvalidDataException($"IDX file {path}: truncated header ({bytes.Length} bytes, expected at least {headerSize})");
        var magic = BinaryPrimitives.ReadInt32BigEndian(bytes);
        if (magic != expectedMagic)
            throw new InvalidDataException($"IDX file {path}: bad magic number (expected {expectedMagic} for {what}, got {magic})");
        if (bytes.Length < headerSize)
            throw new InvalidDataException($"IDX file {path}: truncated header ({bytes.Length} bytes, expected {headerSize})");
        var dims = new long[ndim];
        for (var d = 0; d < ndim; d++)
        {
            dims[d] = BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(4 + 4 * d));
            if (dims[d] == 0)
                throw new InvalidDataException($"IDX file {path}: dimension {d} of the header is zero ({what} header [{string.Join(", ", dims[..(d + 1)])}...])");
        }
        long itemSize = 1;
        for (var d = 1; d < ndim; d++) itemSize = checked(itemSize * dims[d]);
        var count = dims[0];
        var expected = checked(count * itemSize);
        var actual = bytes.LongLength - headerSize;
        var unit = ndim == 3 ? "pixel data" : "label data";
        if (actual < expected)
            throw new InvalidDataException(
                $"IDX file {path}: truncated (expected {expected} bytes of {unit} for the header's {count} {what}, got {actual})");
        if (actual > expected)
            throw new InvalidDataException(
                $"IDX file {path}: header count {count} disagrees with the data ({actual} bytes of {unit} where {count} {what} need {expected}; {actual / (double)itemSize:0.##} items present)");
        if (expected > Array.MaxLength)
            throw new InvalidDataException($"IDX file {path}: {expected} bytes of {unit} is more than one array can hold");
        return (count, dims);
    }
}
