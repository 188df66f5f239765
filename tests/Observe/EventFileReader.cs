using System.Buffers.Binary;
using System.Text;

namespace DistDiffusion.Tests.Observe;

/// <summary>An image summary as read back: its size, colorspace and the encoded bytes.</summary>
internal sealed record EventImage(int Height, int Width, int Colorspace, byte[] Encoded);

/// <summary>One Summary.Value as read back: a scalar (simple_value) or an image.</summary>
internal sealed record EventValue(string Tag, float? Scalar, EventImage? Image);

/// <summary>One tensorflow.Event as read back.</summary>
internal sealed record EventRecord(double WallTime, long Step, string? FileVersion, IReadOnlyList<EventValue> Values);

/// <summary>
/// A reader of TensorBoard event files written for the tests, sharing no code with the coordinator's writer: TFRecord
/// framing (uint64 length, masked CRC-32C of the length, data, masked CRC-32C of the data; both checked, with a bitwise
/// CRC-32C of its own), then the protocol-buffer wire format by hand, unknown fields skipped as the format says.
/// </summary>
internal static class EventFileReader
{
    /// <summary>CRC-32C, bit by bit over the reflected Castagnoli polynomial.</summary>
    public static uint Crc32C(ReadOnlySpan<byte> data)
    {
        var crc = 0xFFFFFFFFu;
        foreach (var b in data)
        {
            crc ^= b;
            for (var bit = 0; bit < 8; bit++) crc = (crc & 1) != 0 ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
        }
        return crc ^ 0xFFFFFFFFu;
    }

    public static uint Masked(uint crc) => unchecked(((crc >> 15) | (crc << 17)) + 0xa282ead8u);

    /// <summary>Every record's data; a CRC that does not match, or a torn record, fails.</summary>
    public static List<byte[]> Records(byte[] file)
    {
        var records = new List<byte[]>();
        var at = 0;
        while (at < file.Length)
        {
            Assert.True(file.Length - at >= 12, $"a torn record header at byte {at} of {file.Length}");
            var header = file.AsSpan(at, 8);
            var length = BinaryPrimitives.ReadUInt64LittleEndian(header);
            Assert.Equal(Masked(Crc32C(header)), BinaryPrimitives.ReadUInt32LittleEndian(file.AsSpan(at + 8)));
            Assert.True((ulong)(file.Length - at - 16) >= length, $"record at byte {at} says {length} bytes; the file has {file.Length - at - 16} after its header");
            var data = file.AsSpan(at + 12, (int)length).ToArray();
            Assert.Equal(Masked(Crc32C(data)), BinaryPrimitives.ReadUInt32LittleEndian(file.AsSpan(at + 12 + (int)length)));
            records.Add(data);
            at += 16 + (int)length;
        }
        return records;
    }

    public static List<EventRecord> Read(string path) => Records(File.ReadAllBytes(path)).Select(Event).ToList();

    private static EventRecord Event(byte[] data)
    {
        double wallTime = 0;
        long step = 0;
        string? fileVersion = null;
        var values = new List<EventValue>();
        foreach (var (field, wire, value, bytes) in Fields(data))
        {
            switch (field)
            {
                case 1 when wire == 1: wallTime = BitConverter.UInt64BitsToDouble(value); break;
                case 2 when wire == 0: step = (long)value; break;
                case 3 when wire == 2: fileVersion = Encoding.UTF8.GetString(bytes!); break;
                case 5 when wire == 2:
                    foreach (var (f, w, _, v) in Fields(bytes!))
                        if (f == 1 && w == 2) values.Add(Value(v!));
                    break;
            }
        }
        return new EventRecord(wallTime, step, fileVersion, values);
    }

    private static EventValue Value(byte[] data)
    {
        string tag = "";
        float? scalar = null;
        EventImage? image = null;
        foreach (var (field, wire, value, bytes) in Fields(data))
        {
            if (field == 1 && wire == 2) tag = Encoding.UTF8.GetString(bytes!);
            else if (field == 2 && wire == 5) scalar = BitConverter.UInt32BitsToSingle((uint)value);
            else if (field == 4 && wire == 2)
            {
                int height = 0, width = 0, colorspace = 0;
                byte[] encoded = [];
                foreach (var (f, w, v, b) in Fields(bytes!))
                {
                    if (f == 1 && w == 0) height = (int)v;
                    else if (f == 2 && w == 0) width = (int)v;
                    else if (f == 3 && w == 0) colorspace = (int)v;
                    else if (f == 4 && w == 2) encoded = b!;
                }
                image = new EventImage(height, width, colorspace, encoded);
            }
        }
        return new EventValue(tag, scalar, image);
    }

    /// <summary>The fields of one message: number, wire type, the number for varint/fixed types, the bytes for length-delimited ones.</summary>
    private static IEnumerable<(int Field, int Wire, ulong Value, byte[]? Bytes)> Fields(byte[] data)
    {
        var at = 0;
        while (at < data.Length)
        {
            var key = Varint(data, ref at);
            var (field, wire) = ((int)(key >> 3), (int)(key & 7));
            switch (wire)
            {
                case 0: yield return (field, wire, Varint(data, ref at), null); break;
                case 1: yield return (field, wire, BinaryPrimitives.ReadUInt64LittleEndian(data.AsSpan(at)), null); at += 8; break;
                case 5: yield return (field, wire, BinaryPrimitives.ReadUInt32LittleEndian(data.AsSpan(at)), null); at += 4; break;
                case 2:
                    var length = (int)Varint(data, ref at);
                    Assert.True(at + length <= data.Length, $"field {field}: {length} bytes past the end of its message");
                    yield return (field, wire, 0, data.AsSpan(at, length).ToArray());
                    at += length;
                    break;
                default: throw new Xunit.Sdk.XunitException($"field {field}: wire type {wire} is not one an Event uses");
            }
        }
    }

    private static ulong Varint(byte[] data, ref int at)
    {
        ulong v = 0;
        for (var shift = 0; ; shift += 7)
        {
            Assert.True(shift < 64 && at < data.Length, "a varint runs past its message or over 10 bytes");
            var b = data[at++];
            v |= (ulong)(b & 0x7F) << shift;
            if (b < 0x80) return v;
        }
    }
}
