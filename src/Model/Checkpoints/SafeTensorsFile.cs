using System.Buffers.Binary;
using System.Globalization;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Checkpoints;

/// <summary>
/// Reads and writes the <see href="https://github.com/huggingface/safetensors">safetensors</see> format:
/// a little-endian u64 header length N, N bytes of UTF-8 JSON (padded with spaces to a multiple of 8),
/// then the data buffer with every tensor stored contiguously, little-endian, in sorted-name order.
/// Files written here load with the Python <c>safetensors</c> package and vice versa (for the supported dtypes).
/// </summary>
public static class SafeTensorsFile
{
    /// <summary>Largest header accepted on read (the reference implementation uses the same bound).</summary>
    public const long MaxHeaderBytes = 100L * 1024 * 1024;

    private const string MetadataKey = "__metadata__";

    private static readonly (string Name, ScalarType Type, int Size)[] DTypes =
    [
        ("F32", ScalarType.Float32, 4),
        ("F64", ScalarType.Float64, 8),
        ("F16", ScalarType.Float16, 2),
        ("BF16", ScalarType.BFloat16, 2),
        ("I64", ScalarType.Int64, 8),
        ("I32", ScalarType.Int32, 4),
        ("U8", ScalarType.Byte, 1),
        ("BOOL", ScalarType.Bool, 1),
    ];

    /// <summary>One tensor's entry in the header, validated.</summary>
    private readonly record struct Entry(string Name, ScalarType Type, long[] Shape, long Begin, long End);

    public static void Write(string path, IReadOnlyDictionary<string, Tensor> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        using var file = new FileStream(path, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 16);
        WriteTo(file, tensors, metadata);
        file.Flush(flushToDisk: true);
    }

    public static byte[] Serialize(IReadOnlyDictionary<string, Tensor> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        using var memory = new MemoryStream();
        WriteTo(memory, tensors, metadata);
        return memory.ToArray();
    }

    /// <summary>Reads a file into CPU tensors. Throws <see cref="InvalidDataException"/> naming the file and the problem.</summary>
    public static (Dictionary<string, Tensor> Tensors, Dictionary<string, string> Metadata) Read(string path)
    {
        using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16);
        var length = file.Length;
        if (length < 8)
            throw Invalid(path, $"file is {length} bytes, shorter than the 8-byte header length (truncated)");
        Span<byte> prefix = stackalloc byte[8];
        file.ReadExactly(prefix);
        var headerLength = CheckHeaderLength(path, BinaryPrimitives.ReadUInt64LittleEndian(prefix), length);
        var header = new byte[headerLength];
        file.ReadExactly(header);
        var dataLength = length - 8 - headerLength;
        var (entries, metadata) = ParseHeader(path, header, dataLength);
        var dataStart = 8 + headerLength;
        return (Materialize(entries, (entry, destination) =>
        {
            file.Position = dataStart + entry.Begin;
            file.ReadExactly(destination);
        }), metadata);
    }

    /// <summary>Parses an in-memory file; <paramref name="sourceName"/> is used in error messages.</summary>
    public static (Dictionary<string, Tensor> Tensors, Dictionary<string, string> Metadata) Deserialize(ReadOnlySpan<byte> bytes, string sourceName)
    {
        if (bytes.Length < 8)
            throw Invalid(sourceName, $"file is {bytes.Length} bytes, shorter than the 8-byte header length (truncated)");
        var headerLength = CheckHeaderLength(sourceName, BinaryPrimitives.ReadUInt64LittleEndian(bytes), bytes.Length);
        var data = bytes[(8 + (int)headerLength)..];
        var (entries, metadata) = ParseHeader(sourceName, bytes.Slice(8, (int)headerLength), data.Length);
        // The span cannot be captured by a lambda: copy tensor by tensor through a plain loop instead.
        var tensors = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        try
        {
            foreach (var entry in entries)
            {
                var tensor = torch.empty(entry.Shape, entry.Type, torch.CPU);
                tensors.Add(entry.Name, tensor);
                if (entry.End > entry.Begin)
                    data[(int)entry.Begin..(int)entry.End].CopyTo(tensor.bytes);
            }
        }
        catch
        {
            DisposeAll(tensors.Values);
            throw;
        }
        return (tensors, metadata);
    }

    /// <summary>The safetensors name of a dtype, e.g. "F32"; throws <see cref="ArgumentException"/> for unsupported ones.</summary>
    public static string DTypeName(ScalarType type)
    {
        foreach (var d in DTypes)
            if (d.Type == type) return d.Name;
        throw new ArgumentException($"dtype {type} is not supported by the checkpoint format (supported: {string.Join(", ", DTypes.Select(d => d.Name))})");
    }

    internal static void DisposeAll(IEnumerable<Tensor> tensors)
    {
        foreach (var t in tensors) t.Dispose();
    }

    // ---------------------------------------------------------------- writing

    private static void WriteTo(Stream stream, IReadOnlyDictionary<string, Tensor> tensors, IReadOnlyDictionary<string, string>? metadata)
    {
        if (!BitConverter.IsLittleEndian)
            throw new PlatformNotSupportedException("safetensors writing assumes a little-endian machine");
        var names = tensors.Keys.OrderBy(n => n, StringComparer.Ordinal).ToArray();
        var prepared = new List<(string Name, Tensor Cpu, bool Owned)>(names.Length);
        try
        {
            foreach (var name in names)
            {
                if (name == MetadataKey)
                    throw new ArgumentException($"tensor name '{MetadataKey}' is reserved by the safetensors format");
                var source = tensors[name] ?? throw new ArgumentException($"tensor '{name}' is null");
                DTypeName(source.dtype); // fail before writing anything
                var cpu = ToCpuContiguous(source);
                prepared.Add((name, cpu, !ReferenceEquals(cpu, source)));
            }

            var header = BuildHeader(prepared.Select(p => (p.Name, p.Cpu)).ToList(), metadata);
            Span<byte> prefix = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(prefix, (ulong)header.Length);
            stream.Write(prefix);
            stream.Write(header);
            foreach (var (_, cpu, _) in prepared)
                if (cpu.numel() > 0)
                    stream.Write(cpu.bytes);
        }
        finally
        {
            foreach (var (_, cpu, owned) in prepared)
                if (owned) cpu.Dispose();
        }
    }

    private static Tensor ToCpuContiguous(Tensor source)
    {
        var detached = source.detach();
        var cpu = detached.cpu();
        if (!ReferenceEquals(cpu, detached)) detached.Dispose();
        var contiguous = cpu.contiguous();
        if (!ReferenceEquals(contiguous, cpu)) cpu.Dispose();
        return contiguous;
    }

    /// <summary>The header JSON (metadata first, then tensors in sorted-name order), padded with spaces to a multiple of 8.</summary>
    private static byte[] BuildHeader(IReadOnlyList<(string Name, Tensor Cpu)> tensors, IReadOnlyDictionary<string, string>? metadata)
    {
        using var buffer = new MemoryStream();
        using (var json = new Utf8JsonWriter(buffer))
        {
            json.WriteStartObject();
            if (metadata is { Count: > 0 })
            {
                json.WriteStartObject(MetadataKey);
                foreach (var (k, v) in metadata.OrderBy(kv => kv.Key, StringComparer.Ordinal))
                    json.WriteString(k, v ?? throw new ArgumentException($"metadata value for '{k}' is null"));
                json.WriteEndObject();
            }
            long offset = 0;
            foreach (var (name, cpu) in tensors)
            {
                var byteLength = checked(cpu.numel() * cpu.ElementSize);
                json.WriteStartObject(name);
                json.WriteString("dtype", DTypeName(cpu.dtype));
                json.WriteStartArray("shape");
                foreach (var d in cpu.shape) json.WriteNumberValue(d);
                json.WriteEndArray();
                json.WriteStartArray("data_offsets");
                json.WriteNumberValue(offset);
                json.WriteNumberValue(offset + byteLength);
                json.WriteEndArray();
                json.WriteEndObject();
                offset += byteLength;
            }
            json.WriteEndObject();
        }
        var padding = (int)((8 - buffer.Length % 8) % 8);
        for (var i = 0; i < padding; i++) buffer.WriteByte((byte)' ');
        return buffer.ToArray();
    }

    // ---------------------------------------------------------------- reading

    private static long CheckHeaderLength(string source, ulong headerLength, long fileLength)
    {
        if (headerLength > MaxHeaderBytes)
            throw Invalid(source, $"header length {headerLength} exceeds the {MaxHeaderBytes}-byte limit");
        if ((long)headerLength > fileLength - 8)
            throw Invalid(source, $"header length {headerLength} extends beyond the end of the file ({fileLength} bytes; truncated?)");
        return (long)headerLength;
    }

    private static (List<Entry> Entries, Dictionary<string, string> Metadata) ParseHeader(string source, ReadOnlySpan<byte> header, long dataLength)
    {
        // JsonDocument checks a string's UTF-8 only when it is read (an InvalidOperationException then): check it all first.
        if (!System.Text.Unicode.Utf8.IsValid(header))
            throw Invalid(source, "header is not valid UTF-8");
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(header.ToArray(), new JsonDocumentOptions { MaxDepth = 16 });
        }
        catch (JsonException e)
        {
            throw Invalid(source, $"header is not valid JSON: {e.Message}", e);
        }
        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw Invalid(source, $"header JSON is a {root.ValueKind}, expected an object");
            var entries = new List<Entry>();
            var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
            var seen = new HashSet<string>(StringComparer.Ordinal);
            foreach (var property in root.EnumerateObject())
            {
                var name = property.Name;
                if (!seen.Add(name))
                    throw Invalid(source, $"duplicate name '{name}' in header");
                if (name == MetadataKey)
                {
                    if (property.Value.ValueKind != JsonValueKind.Object)
                        throw Invalid(source, $"'{MetadataKey}' is a {property.Value.ValueKind}, expected an object of strings");
                    foreach (var m in property.Value.EnumerateObject())
                    {
                        if (m.Value.ValueKind != JsonValueKind.String)
                            throw Invalid(source, $"metadata '{m.Name}' is a {m.Value.ValueKind}, expected a string");
                        if (!metadata.TryAdd(m.Name, m.Value.GetString()!))
                            throw Invalid(source, $"duplicate metadata key '{m.Name}' in header");
                    }
                    continue;
                }
                entries.Add(ParseEntry(source, name, property.Value));
            }
            CheckLayout(source, entries, dataLength);
            return (entries.OrderBy(e => e.Name, StringComparer.Ordinal).ToList(), metadata);
        }
    }

    private static Entry ParseEntry(string source, string name, JsonElement value)
    {
        if (value.ValueKind != JsonValueKind.Object)
            throw Invalid(source, $"tensor '{name}': entry is a {value.ValueKind}, expected an object");
        if (!value.TryGetProperty("dtype", out var dtypeElement) || dtypeElement.ValueKind != JsonValueKind.String)
            throw Invalid(source, $"tensor '{name}': missing or non-string 'dtype'");
        var dtypeName = dtypeElement.GetString()!;
        var dtype = Array.FindIndex(DTypes, d => d.Name == dtypeName);
        if (dtype < 0)
            throw Invalid(source, $"tensor '{name}': unknown dtype '{dtypeName}' (supported: {string.Join(", ", DTypes.Select(d => d.Name))})");
        var shape = ReadIntegers(source, name, value, "shape");
        foreach (var d in shape)
            if (d < 0)
                throw Invalid(source, $"tensor '{name}': shape [{string.Join(", ", shape)}] has a negative dimension");
        var offsets = ReadIntegers(source, name, value, "data_offsets");
        if (offsets.Length != 2)
            throw Invalid(source, $"tensor '{name}': data_offsets has {offsets.Length} values, expected [begin, end]");
        var (begin, end) = (offsets[0], offsets[1]);
        if (begin < 0 || end < begin)
            throw Invalid(source, $"tensor '{name}': data_offsets [{begin}, {end}] are not [begin, end] with 0 <= begin <= end");
        long expected;
        try
        {
            expected = DTypes[dtype].Size;
            foreach (var d in shape) expected = checked(expected * d);
        }
        catch (OverflowException)
        {
            throw Invalid(source, $"tensor '{name}': shape [{string.Join(", ", shape)}] is too large");
        }
        if (end - begin != expected)
            throw Invalid(source, $"tensor '{name}': byte length {end - begin} (data_offsets [{begin}, {end}]) does not match shape [{string.Join(", ", shape)}] x {dtypeName} = {expected} bytes");
        return new Entry(name, DTypes[dtype].Type, shape, begin, end);
    }

    private static long[] ReadIntegers(string source, string name, JsonElement entry, string key)
    {
        if (!entry.TryGetProperty(key, out var array) || array.ValueKind != JsonValueKind.Array)
            throw Invalid(source, $"tensor '{name}': missing or non-array '{key}'");
        var values = new long[array.GetArrayLength()];
        var i = 0;
        foreach (var item in array.EnumerateArray())
        {
            if (item.ValueKind != JsonValueKind.Number || !item.TryGetInt64(out values[i]))
                throw Invalid(source, $"tensor '{name}': '{key}' holds {item.GetRawText()}, expected integers");
            i++;
        }
        return values;
    }

    /// <summary>Offsets must tile the data buffer exactly: no overlap, no gap, nothing left over.</summary>
    private static void CheckLayout(string source, List<Entry> entries, long dataLength)
    {
        long position = 0;
        string? previous = null;
        foreach (var e in entries.OrderBy(e => e.Begin).ThenBy(e => e.End))
        {
            if (e.Begin < position)
                throw Invalid(source, $"tensor '{e.Name}': data_offsets [{e.Begin}, {e.End}] overlap tensor '{previous}' (which ends at {position})");
            if (e.Begin > position)
                throw Invalid(source, $"tensor '{e.Name}': data_offsets [{e.Begin}, {e.End}] leave a gap of {e.Begin - position} bytes after offset {position}");
            position = e.End;
            previous = e.Name;
        }
        if (position != dataLength)
            throw Invalid(source, position < dataLength
                ? $"tensors cover {position} bytes but the data buffer holds {dataLength} bytes ({dataLength - position} unaccounted for)"
                : $"tensors need {position} bytes but the data buffer holds only {dataLength} bytes (truncated)");
    }

    private static Dictionary<string, Tensor> Materialize(List<Entry> entries, Action<Entry, Span<byte>> fill)
    {
        var tensors = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        try
        {
            foreach (var entry in entries)
            {
                var tensor = torch.empty(entry.Shape, entry.Type, torch.CPU);
                tensors.Add(entry.Name, tensor);
                if (entry.End > entry.Begin)
                    fill(entry, tensor.bytes);
            }
            return tensors;
        }
        catch
        {
            DisposeAll(tensors.Values);
            throw;
        }
    }

    private static InvalidDataException Invalid(string source, string problem, Exception? inner = null) =>
        new(string.Create(CultureInfo.InvariantCulture, $"{source}: {problem}"), inner);
}
