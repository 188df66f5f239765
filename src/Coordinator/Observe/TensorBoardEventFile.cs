using System.Buffers.Binary;
using System.Globalization;
using System.Numerics;
using System.Runtime.InteropServices;
using System.Text;

namespace DistDiffusion.Coordinator.Observe;

/// <summary>
/// One TensorBoard event file (events.out.tfevents.TIME.HOST.PID.N): TFRecord records (little-endian uint64 length,
/// masked CRC-32C of those 8 bytes, the data, masked CRC-32C of the data), each a tensorflow.Event message. The first
/// is the file_version "brain.Event:2" TensorBoard looks for; then scalar summaries (Summary.Value.simple_value) and
/// image summaries (Summary.Value.image: a PNG as it is on disk). Only the fields written here are encoded:
/// Event {1 wall_time double, 2 step int64, 3 file_version string, 5 summary}; Summary {1 value repeated};
/// Summary.Value {1 tag string, 2 simple_value float, 4 image}; Summary.Image {1 height, 2 width, 3 colorspace int32,
/// 4 encoded_image_string bytes}. Not thread-safe (<see cref="TensorBoardSink"/> serializes its calls).
/// </summary>
/// <remarks>
/// TorchSharp 0.107's SummaryWriter writes the same framing, but takes whole seconds for wall times and an int32 step,
/// stamps its file_version event with DateTime.Now.Ticks (local .NET ticks, not Unix seconds) and opens, seeks and closes
/// the file for every event; it also has no way to keep a failing disk from throwing into the training loop. The encoding
/// is written here rather than with Google.Protobuf's CodedOutputStream, whose one array constructor wants an array of
/// exactly the message's size (a new one per event): this class reuses one buffer.
/// </remarks>
public sealed class TensorBoardEventFile : IDisposable
{
    public const string FileVersion = "brain.Event:2";
    public const string FilePrefix = "events.out.tfevents.";

    private const uint MaskDelta = 0xa282ead8;
    private static int _opened;

    private readonly FileStream _stream;
    private byte[] _buffer = new byte[4096];
    private int _at;

    /// <summary>Creates a new event file in <paramref name="directory"/> (made if missing) and writes its file_version event.</summary>
    public TensorBoardEventFile(string directory, DateTimeOffset now)
    {
        Directory.CreateDirectory(directory);
        var name = string.Create(CultureInfo.InvariantCulture,
            $"{FilePrefix}{now.ToUnixTimeSeconds()}.{Environment.MachineName}.{Environment.ProcessId}.{Interlocked.Increment(ref _opened)}");
        Path = System.IO.Path.Combine(directory, name);
        _stream = new FileStream(Path, FileMode.CreateNew, FileAccess.Write, FileShare.Read | FileShare.Delete, 64 * 1024);
        try
        {
            Begin();
            Fixed64(1, BitConverter.DoubleToUInt64Bits(WallTime(now)));
            Bytes(3, Encoding.UTF8.GetBytes(FileVersion));
            End();
            _stream.Flush();
        }
        catch
        {
            _stream.Dispose();
            throw;
        }
    }

    /// <summary>The event file's full path.</summary>
    public string Path { get; }

    /// <summary>Seconds since the Unix epoch, to the 100 ns tick (Event.wall_time).</summary>
    public static double WallTime(DateTimeOffset time) => (time.UtcTicks - DateTimeOffset.UnixEpoch.UtcTicks) / (double)TimeSpan.TicksPerSecond;

    /// <summary>One event at <paramref name="step"/> holding a scalar summary per (tag, value).</summary>
    public void WriteScalars(long step, DateTimeOffset time, IReadOnlyList<(string Tag, float Value)> values)
    {
        ArgumentNullException.ThrowIfNull(values);
        var summary = 0;
        foreach (var (tag, _) in values) summary += Field(1, ScalarSize(tag));
        Begin();
        EventHeader(step, time);
        Length(5, summary);
        foreach (var (tag, value) in values)
        {
            Length(1, ScalarSize(tag));
            Text(1, tag);
            Tag(2, WireFixed32);
            Ensure(4);
            BinaryPrimitives.WriteSingleLittleEndian(_buffer.AsSpan(_at), value);
            _at += 4;
        }
        End();
    }

    /// <summary>One event at <paramref name="step"/> holding an image summary of <paramref name="png"/> (its bytes as they are).</summary>
    public void WriteImage(long step, DateTimeOffset time, string tag, ReadOnlySpan<byte> png, PngHeader header)
    {
        ArgumentNullException.ThrowIfNull(tag);
        var image = 1 + VarintSize((ulong)header.Height) + 1 + VarintSize((ulong)header.Width) + 1 + VarintSize((ulong)header.Colorspace) + Field(4, png.Length);
        var value = Field(1, Encoding.UTF8.GetByteCount(tag)) + Field(4, image);
        Begin();
        EventHeader(step, time);
        Length(5, Field(1, value));
        Length(1, value);
        Text(1, tag);
        Length(4, image);
        Varint(1, (ulong)header.Height);
        Varint(2, (ulong)header.Width);
        Varint(3, (ulong)header.Colorspace);
        Bytes(4, png);
        End();
    }

    /// <summary>Hands what was written to the operating system, where a TensorBoard reading the file sees it.</summary>
    public void Flush() => _stream.Flush();

    public void Dispose() => _stream.Dispose();

    // Protocol buffers' wire format, as much of it as these messages need.
    private const int WireVarint = 0, WireFixed64 = 1, WireLength = 2, WireFixed32 = 5;

    private static int VarintSize(ulong v) => v < 0x80 ? 1 : (70 - BitOperations.LeadingZeroCount(v)) / 7;

    /// <summary>The bytes of a length-delimited field whose body is <paramref name="size"/> bytes: tag, length, body.</summary>
    private static int Field(int field, int size) => VarintSize((ulong)(field << 3)) + VarintSize((ulong)size) + size;

    private static int ScalarSize(string tag) => Field(1, Encoding.UTF8.GetByteCount(tag)) + 1 + 4;

    private void EventHeader(long step, DateTimeOffset time)
    {
        Fixed64(1, BitConverter.DoubleToUInt64Bits(WallTime(time)));
        Varint(2, (ulong)step);
    }

    private void Ensure(int bytes)
    {
        if (_at + bytes + 4 > _buffer.Length) Array.Resize(ref _buffer, Math.Max(_at + bytes + 4, _buffer.Length * 2));
    }

    private void RawVarint(ulong v)
    {
        Ensure(10);
        while (v >= 0x80)
        {
            _buffer[_at++] = (byte)(v | 0x80);
            v >>= 7;
        }
        _buffer[_at++] = (byte)v;
    }

    private void Tag(int field, int wire) => RawVarint((ulong)((field << 3) | wire));

    private void Varint(int field, ulong v)
    {
        Tag(field, WireVarint);
        RawVarint(v);
    }

    private void Fixed64(int field, ulong v)
    {
        Tag(field, WireFixed64);
        Ensure(8);
        BinaryPrimitives.WriteUInt64LittleEndian(_buffer.AsSpan(_at), v);
        _at += 8;
    }

    /// <summary>The tag and length of a nested message or bytes field; its body follows.</summary>
    private void Length(int field, int size)
    {
        Tag(field, WireLength);
        RawVarint((ulong)size);
    }

    private void Bytes(int field, ReadOnlySpan<byte> bytes)
    {
        Length(field, bytes.Length);
        Ensure(bytes.Length);
        bytes.CopyTo(_buffer.AsSpan(_at));
        _at += bytes.Length;
    }

    private void Text(int field, string text)
    {
        var size = Encoding.UTF8.GetByteCount(text);
        Length(field, size);
        Ensure(size);
        _at += Encoding.UTF8.GetBytes(text, _buffer.AsSpan(_at));
    }

    /// <summary>Starts a record in the reused buffer: its data goes after the 12-byte header.</summary>
    private void Begin() => _at = 12;

    /// <summary>Frames the data written since <see cref="Begin"/> and appends the record to the file.</summary>
    private void End()
    {
        var size = _at - 12;
        Ensure(0);
        var record = _buffer.AsSpan(0, _at + 4);
        BinaryPrimitives.WriteUInt64LittleEndian(record, (ulong)size);
        BinaryPrimitives.WriteUInt32LittleEndian(record[8..], MaskedCrc(record[..8]));
        BinaryPrimitives.WriteUInt32LittleEndian(record[_at..], MaskedCrc(record.Slice(12, size)));
        _stream.Write(record);
        // A picture's buffer is not kept: the next scalar event starts small again.
        if (_buffer.Length > 1 << 20) _buffer = new byte[4096];
    }

    /// <summary>TFRecord's mask of a CRC-32C: rotated right by 15 bits, plus a constant.</summary>
    public static uint MaskedCrc(ReadOnlySpan<byte> data)
    {
        var crc = Crc32C(data);
        return ((crc >> 15) | (crc << 17)) + MaskDelta;
    }

    /// <summary>CRC-32C (Castagnoli; the processor's crc32 instruction where it has one), 8 bytes at a time.</summary>
    public static uint Crc32C(ReadOnlySpan<byte> data)
    {
        var crc = uint.MaxValue;
        var words = MemoryMarshal.Cast<byte, ulong>(data);
        foreach (var w in words) crc = BitOperations.Crc32C(crc, BitConverter.IsLittleEndian ? w : BinaryPrimitives.ReverseEndianness(w));
        foreach (var b in data[(words.Length * 8)..]) crc = BitOperations.Crc32C(crc, b);
        return ~crc;
    }
}

/// <summary>What an image summary says about a PNG: its size and TensorBoard's colorspace (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).</summary>
public readonly record struct PngHeader(int Width, int Height, int Colorspace)
{
    private static readonly byte[] Signature = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A];

    /// <summary>Reads the IHDR chunk that opens every PNG; anything else is an <see cref="InvalidDataException"/>.</summary>
    public static PngHeader Read(ReadOnlySpan<byte> png, string what)
    {
        if (png.Length < 33 || !png[..8].SequenceEqual(Signature) || !png.Slice(12, 4).SequenceEqual("IHDR"u8))
            throw new InvalidDataException($"{what}: not a PNG file (expected the PNG signature and an IHDR chunk)");
        var width = BinaryPrimitives.ReadInt32BigEndian(png[16..]);
        var height = BinaryPrimitives.ReadInt32BigEndian(png[20..]);
        if (width <= 0 || height <= 0) throw new InvalidDataException($"{what}: PNG size {width}x{height}: expected positive dimensions");
        var colorspace = png[25] switch
        {
            0 => 1,     // greyscale
            4 => 2,     // greyscale with alpha
            2 or 3 => 3, // RGB, palette (decoded as RGB)
            6 => 4,     // RGBA
            var other => throw new InvalidDataException($"{what}: PNG colour type {other}: expected 0, 2, 3, 4 or 6"),
        };
        return new PngHeader(width, height, colorspace);
    }
}
