using System.Buffers.Binary;
using System.IO.Compression;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Data;

/// <summary>
/// Reads the IDX files of MNIST-style datasets (LeCun et al.), gzip-compressed (detected by the
/// 1f 8b magic, whatever the file is called) or raw. Every format problem raises an
/// <see cref="InvalidDataException"/> whose message names the file and what is wrong. Data files are untrusted:
/// a header may declare at most <see cref="MaxDataBytes"/> bytes of data and <see cref="MaxImageSide"/> pixels a
/// side, and gzip data is inflated only up to the size its header declares.
/// </summary>
public static class IdxReader
{
    /// <summary>IDX3 magic: unsigned byte data, 3 dimensions.</summary>
    public const int ImagesMagic = 2051;

    /// <summary>IDX1 magic: unsigned byte data, 1 dimension.</summary>
    public const int LabelsMagic = 2049;

    /// <summary>Most bytes of pixel or label data one file may declare (1 GiB; MNIST's 60,000 training images are 47 MB).</summary>
    public const long MaxDataBytes = 1L << 30;

    /// <summary>Widest and tallest image an IDX header may declare.</summary>
    public const int MaxImageSide = 4096;

    /// <summary>Images as [N, 1, rows, cols] float32, pixel p in 0..255 mapped to p / 127.5 - 1 in [-1, 1].</summary>
    public static Tensor ReadImages(string path)
    {
        var bytes = ReadDecompressed(path, ImagesMagic, 3, "images");
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
        var bytes = ReadDecompressed(path, LabelsMagic, 1, "labels");
        var (count, _) = ParseHeader(path, bytes, LabelsMagic, 1, "labels");
        var labels = new long[count];
        var src = bytes.AsSpan(8);
        for (var i = 0; i < labels.Length; i++)
            labels[i] = src[i];
        return torch.tensor(labels, [count], dtype: ScalarType.Int64);
    }

    private static byte[] ReadDecompressed(string path, int expectedMagic, int ndim, string what)
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
                return Inflate(path, gz, expectedMagic, ndim, what);
            }
            catch (Exception e) when (e is InvalidDataException or EndOfStreamException or IOException && e.Data[BombKey] is null)
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

    /// <summary>Marks the errors <see cref="Inflate"/> raises itself, so they are not re-labelled as corrupt gzip data.</summary>
    private const string BombKey = "idx.limit";

    /// <summary>
    /// Inflates the header first, and then at most the data bytes that header declares (plus one, to tell that there is
    /// more): a small gzip that inflates to gigabytes (a "gzip bomb") is stopped at the size its header claims, and a
    /// header declaring absurd dimensions is refused before anything else is inflated.
    /// </summary>
    private static byte[] Inflate(string path, Stream gz, int expectedMagic, int ndim, string what)
    {
        var headerSize = 4 + 4 * ndim;
        var header = new byte[headerSize];
        var got = gz.ReadAtLeast(header, headerSize, throwOnEndOfStream: false);
        // A short or wrong header: hand over what there is, ParseHeader names the problem.
        if (got < headerSize || BinaryPrimitives.ReadInt32BigEndian(header) != expectedMagic)
            return header[..got];
        var dims = new long[ndim];
        for (var d = 0; d < ndim; d++) dims[d] = BinaryPrimitives.ReadUInt32BigEndian(header.AsSpan(4 + 4 * d));
        if (dims.Contains(0)) return header;
        var dataBytes = CheckDimensions(path, dims, what);
        var declared = headerSize + dataBytes;
        using var output = new MemoryStream((int)Math.Min(declared + 1, 1 << 24));
        output.Write(header);
        var buffer = new byte[1 << 16];
        while (true)
        {
            var room = declared + 1 - output.Length;   // one byte past the declared size proves there is more
            if (room <= 0)
            {
                var e = new InvalidDataException($"IDX file {path}: gzip data inflates to more than the {declared} bytes its header declares ({Describe(dims, what)}); stopped there");
                e.Data[BombKey] = true;
                throw e;
            }
            var n = gz.Read(buffer, 0, (int)Math.Min(buffer.Length, room));
            if (n == 0) break;
            output.Write(buffer, 0, n);
        }
        return output.ToArray();
    }

    private static string Describe(long[] dims, string what) =>
        dims.Length == 3 ? $"{dims[0]} {what} of {dims[1]}x{dims[2]} pixels" : $"{dims[0]} {what}";

    /// <summary>The data bytes the header's dimensions (all non-zero) declare, after checking they are within the limits.</summary>
    private static long CheckDimensions(string path, long[] dims, string what)
    {
        InvalidDataException Absurd(string why)
        {
            var e = new InvalidDataException($"IDX file {path}: header declares {Describe(dims, what)}: {why}");
            e.Data[BombKey] = true;
            return e;
        }
        for (var d = 1; d < dims.Length; d++)
            if (dims[d] > MaxImageSide)
                throw Absurd($"expected images of at most {MaxImageSide} pixels a side");
        long bytes = 1;
        foreach (var d in dims)
        {
            if (bytes > MaxDataBytes / d)
                throw Absurd($"more than the limit of {MaxDataBytes} bytes of data per file");
            bytes *= d;
        }
        return bytes;
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
        var expected = CheckDimensions(path, dims, what);
        long itemSize = 1;
        for (var d = 1; d < ndim; d++) itemSize *= dims[d];
        var count = dims[0];
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
