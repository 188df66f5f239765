using System.Buffers.Binary;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.RegularExpressions;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Imaging;

/// <summary>
/// NumPy .npy files, format version 1.0: little-endian float32 ('&lt;f4') or int64 ('&lt;i8'), C order.
/// The header dict is padded with spaces and a final newline so the data starts at a multiple of 64 bytes.
/// </summary>
public static partial class Npy
{
    private static readonly byte[] Magic = [0x93, (byte)'N', (byte)'U', (byte)'M', (byte)'P', (byte)'Y'];

    /// <summary>Writes <paramref name="t"/> (float32 or int64, any device) atomically to <paramref name="path"/>.</summary>
    public static void Write(string path, Tensor t)
    {
        ArgumentNullException.ThrowIfNull(t);
        var descr = t.dtype switch
        {
            ScalarType.Float32 => "<f4",
            ScalarType.Int64 => "<i8",
            _ => throw new ArgumentException($"Npy.Write supports float32 and int64 tensors, got {t.dtype}", nameof(t)),
        };
        var header = Header(descr, t.shape);
        byte[] payload;
        using (var scope = torch.NewDisposeScope())
        {
            var c = t.detach().cpu().contiguous();
            payload = t.dtype == ScalarType.Float32
                ? ToLittleEndian(c.data<float>().ToArray())
                : ToLittleEndian(c.data<long>().ToArray());
        }
        var bytes = new byte[header.Length + payload.Length];
        header.CopyTo(bytes, 0);
        payload.CopyTo(bytes, header.Length);
        PngIO.WriteAtomically(path, bytes);
    }

    /// <summary>The complete header (magic, version, length, padded dict) for a v1.0 file.</summary>
    internal static byte[] Header(string descr, long[] shape)
    {
        var shapeText = shape.Length switch
        {
            0 => "()",
            1 => $"({shape[0].ToString(CultureInfo.InvariantCulture)},)",
            _ => "(" + string.Join(", ", shape.Select(d => d.ToString(CultureInfo.InvariantCulture))) + ")",
        };
        var dict = $"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shapeText}, }}";
        var unpadded = Magic.Length + 2 + 2 + dict.Length + 1;
        var total = (unpadded + 63) / 64 * 64;
        var text = dict + new string(' ', total - unpadded) + "\n";
        if (text.Length > ushort.MaxValue) throw new ArgumentException($"shape with {shape.Length} dimensions does not fit a v1.0 header");
        var header = new byte[total];
        Magic.CopyTo(header, 0);
        header[6] = 1;
        header[7] = 0;
        BinaryPrimitives.WriteUInt16LittleEndian(header.AsSpan(8), (ushort)text.Length);
        Encoding.ASCII.GetBytes(text, header.AsSpan(10));
        return header;
    }

    /// <summary>Reads a v1.0 (or 2.0) '&lt;f4' or '&lt;i8' C-order file; <see cref="InvalidDataException"/> naming the file for anything else.</summary>
    public static Tensor Read(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        if (!File.Exists(path)) throw new FileNotFoundException($"npy file {path} does not exist", path);
        var bytes = File.ReadAllBytes(path);
        if (bytes.Length < 10 || !bytes.AsSpan(0, 6).SequenceEqual(Magic))
            throw new InvalidDataException($"npy file {path}: missing the \\x93NUMPY magic");
        var major = bytes[6];
        int headerLen, dataStart;
        if (major == 1)
        {
            headerLen = BinaryPrimitives.ReadUInt16LittleEndian(bytes.AsSpan(8));
            dataStart = 10 + headerLen;
        }
        else if (major is 2 or 3 && bytes.Length >= 12)
        {
            headerLen = checked((int)BinaryPrimitives.ReadUInt32LittleEndian(bytes.AsSpan(8)));
            dataStart = 12 + headerLen;
        }
        else
        {
            throw new InvalidDataException($"npy file {path}: unsupported format version {major}.{bytes[7]}");
        }
        if (dataStart > bytes.Length)
            throw new InvalidDataException($"npy file {path}: header length {headerLen} runs past the end of the file ({bytes.Length} bytes)");
        var dict = Encoding.ASCII.GetString(bytes, dataStart - headerLen, headerLen);

        var descr = DescrRegex().Match(dict);
        if (!descr.Success)
            throw new InvalidDataException($"npy file {path}: header has no 'descr': {dict.Trim()}");
        var dtype = descr.Groups[1].Value switch
        {
            "<f4" => ScalarType.Float32,
            "<i8" => ScalarType.Int64,
            var d => throw new InvalidDataException($"npy file {path}: unsupported dtype '{d}' (expected '<f4' or '<i8')"),
        };
        var fortran = FortranRegex().Match(dict);
        if (!fortran.Success)
            throw new InvalidDataException($"npy file {path}: header has no 'fortran_order': {dict.Trim()}");
        if (fortran.Groups[1].Value != "False")
            throw new InvalidDataException($"npy file {path}: Fortran-order arrays are not supported");
        var shapeMatch = ShapeRegex().Match(dict);
        if (!shapeMatch.Success)
            throw new InvalidDataException($"npy file {path}: header has no valid 'shape': {dict.Trim()}");
        long[] shape;
        try
        {
            shape = shapeMatch.Groups[1].Value.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
                .Select(s => long.Parse(s, NumberStyles.None, CultureInfo.InvariantCulture)).ToArray();
        }
        catch (Exception e) when (e is FormatException or OverflowException)
        {
            throw new InvalidDataException($"npy file {path}: bad shape '({shapeMatch.Groups[1].Value})'", e);
        }

        var elemSize = dtype == ScalarType.Float32 ? 4 : 8;
        long count = 1;
        foreach (var d in shape) count = checked(count * d);
        var expected = checked(count * elemSize);
        var actual = bytes.LongLength - dataStart;
        if (actual != expected)
            throw new InvalidDataException(
                $"npy file {path}: expected {expected} bytes of data for shape ({string.Join(", ", shape)}) of {descr.Groups[1].Value}, got {actual}");

        var data = bytes.AsSpan(dataStart);
        if (dtype == ScalarType.Float32)
        {
            var values = new float[count];
            for (var i = 0; i < values.Length; i++) values[i] = BinaryPrimitives.ReadSingleLittleEndian(data[(i * 4)..]);
            return torch.tensor(values, shape, dtype: ScalarType.Float32);
        }
        else
        {
            var values = new long[count];
            for (var i = 0; i < values.Length; i++) values[i] = BinaryPrimitives.ReadInt64LittleEndian(data[(i * 8)..]);
            return torch.tensor(values, shape, dtype: ScalarType.Int64);
        }
    }

    private static byte[] ToLittleEndian(float[] values)
    {
        var bytes = new byte[values.Length * 4];
        if (BitConverter.IsLittleEndian) MemoryMarshal.AsBytes(values.AsSpan()).CopyTo(bytes);
        else for (var i = 0; i < values.Length; i++) BinaryPrimitives.WriteSingleLittleEndian(bytes.AsSpan(i * 4), values[i]);
        return bytes;
    }

    private static byte[] ToLittleEndian(long[] values)
    {
        var bytes = new byte[values.Length * 8];
        if (BitConverter.IsLittleEndian) MemoryMarshal.AsBytes(values.AsSpan()).CopyTo(bytes);
        else for (var i = 0; i < values.Length; i++) BinaryPrimitives.WriteInt64LittleEndian(bytes.AsSpan(i * 8), values[i]);
        return bytes;
    }

    [GeneratedRegex(@"'descr'\s*:\s*'([^']*)'")]
    private static partial Regex DescrRegex();

    [GeneratedRegex(@"'fortran_order'\s*:\s*(True|False)")]
    private static partial Regex FortranRegex();

    [GeneratedRegex(@"'shape'\s*:\s*\(([\d\s,]*)\)")]
    private static partial Regex ShapeRegex();
}
