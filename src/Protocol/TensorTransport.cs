using System.Buffers.Binary;
using System.IO.Hashing;
using System.Runtime.InteropServices;
using DistDiffusion.Protocol.V1;
using Google.Protobuf;
using Grpc.Core;

namespace DistDiffusion.Protocol;

/// <summary>
/// Tensors on the wire: a <see cref="TensorHeader"/> (step, version, dtype, shape, byte length, XxHash3
/// checksum) followed by <see cref="TensorChunk"/>s of at most 1 MiB that wrap the payload buffer without
/// copying it (<see cref="UnsafeByteOperations.UnsafeWrap"/>). The payload is little-endian, as in memory here.
/// </summary>
public static class TensorTransport
{
    public const int ChunkBytes = 1 << 20;

    public static int ElementSize(DType dtype) => dtype switch
    {
        DType.Float32 => 4,
        DType.Bfloat16 => 2,
        _ => throw new ProtocolException(StatusCode.InvalidArgument, $"dtype {dtype}: expected DTYPE_FLOAT32 or DTYPE_BFLOAT16", "dtype"),
    };

    /// <summary>
    /// XXH3 (64-bit, seed 0) of the payload bytes. Protocol 3 moved from XxHash64: vectorized, XXH3 hashes the swiss roll's
    /// 1.9 MB in ~0.07 ms here against XxHash64's ~0.24 ms, and a tensor on a stream is hashed four times per step.
    /// </summary>
    public static ulong Checksum(ReadOnlySpan<byte> payload) => XxHash3.HashToUInt64(payload);

    /// <summary>The checksum of float32 values as they travel (their little-endian bytes).</summary>
    public static ulong Checksum(ReadOnlySpan<float> values) => Checksum(MemoryMarshal.AsBytes(values));

    public static uint ChunkCount(long byteLength) => (uint)((byteLength + ChunkBytes - 1) / ChunkBytes);

    public static TensorHeader Header(ReadOnlySpan<byte> payload, DType dtype, long elements, ulong step, ulong version) => new()
    {
        Step = step,
        ParameterVersion = version,
        Dtype = dtype,
        Shape = { elements },
        ByteLength = (ulong)payload.Length,
        Checksum = Checksum(payload),
        ChunkCount = ChunkCount(payload.Length),
    };

    /// <summary>
    /// The header of a payload written to a shared-memory region as write <paramref name="sequence"/>: no checksum (the
    /// reader checks the region's write sequence instead, see <see cref="SharedTensorSegment"/>) and no chunks.
    /// </summary>
    public static TensorHeader SharedHeader(long byteLength, DType dtype, long elements, ulong step, ulong version, ulong sequence) => new()
    {
        Step = step,
        ParameterVersion = version,
        Dtype = dtype,
        Shape = { elements },
        ByteLength = (ulong)byteLength,
        SharedMemory = true,
        SharedSequence = sequence,
    };

    /// <summary>The payload cut into chunks that reference <paramref name="payload"/> (which must not change until they are sent).</summary>
    public static IEnumerable<TensorChunk> Chunks(ReadOnlyMemory<byte> payload, ulong step, ulong version)
    {
        for (int offset = 0, index = 0; offset < payload.Length; offset += ChunkBytes, index++)
        {
            var length = Math.Min(ChunkBytes, payload.Length - offset);
            yield return new TensorChunk
            {
                Step = step,
                ParameterVersion = version,
                Index = (uint)index,
                Data = UnsafeByteOperations.UnsafeWrap(payload.Slice(offset, length)),
            };
        }
    }

    /// <summary>float32 -> bfloat16 (round to nearest even; NaN stays NaN), little-endian.</summary>
    public static byte[] ToBFloat16(ReadOnlySpan<float> values)
    {
        var bytes = new byte[values.Length * 2];
        var bits = MemoryMarshal.Cast<float, uint>(values);
        for (var i = 0; i < bits.Length; i++)
        {
            var b = bits[i];
            ushort h = (b & 0x7FFFFFFF) > 0x7F800000
                ? (ushort)((b >> 16) | 0x40)                                   // quiet NaN
                : (ushort)((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
            BinaryPrimitives.WriteUInt16LittleEndian(bytes.AsSpan(i * 2), h);
        }
        return bytes;
    }

    /// <summary>Decodes a payload of <paramref name="dtype"/> into float32.</summary>
    public static float[] ToFloat32(ReadOnlySpan<byte> payload, DType dtype)
    {
        if (dtype == DType.Float32)
            return MemoryMarshal.Cast<byte, float>(payload).ToArray();
        var result = new float[payload.Length / 2];
        var bits = MemoryMarshal.Cast<float, uint>(result.AsSpan());
        for (var i = 0; i < result.Length; i++)
            bits[i] = (uint)BinaryPrimitives.ReadUInt16LittleEndian(payload[(i * 2)..]) << 16;
        return result;
    }
}

/// <summary>
/// Receives one tensor: checks the header against what is expected, accepts chunks idempotently (a
/// duplicate chunk index is ignored), and on completion verifies the checksum and decodes to float32.
/// Every violation is a <see cref="ProtocolException"/> naming the value and what was expected.
/// </summary>
public sealed class TensorAssembler
{
    // float32 payloads are received straight into the float array handed out by ToFloat32 (no second copy).
    private readonly float[]? _floats;
    private readonly byte[]? _bytes;
    private readonly bool[] _received;
    private int _receivedCount;
    // The checksum is taken as the chunks come in order, each block hashed as it is copied, while it is in cache;
    // _hashed chunks from the start are in it. Chunks that come out of order are hashed when their turn comes.
    private readonly XxHash3 _hash = new();
    private int _hashed;
    private const int HashBlockBytes = 32 << 10;

    /// <param name="destination">float32 payloads are received straight into this array when given (a pooled buffer of
    /// <paramref name="expectedElements"/> floats); otherwise a new one.</param>
    public TensorAssembler(TensorHeader header, long expectedElements, string what, float[]? destination = null)
    {
        Header = header;
        What = what;
        CheckHeader(header, expectedElements, what);
        if (header.SharedMemory)
            throw new ProtocolException(StatusCode.FailedPrecondition, $"{what}: the payload is in shared memory, but this connection has no segment", "tensor.shared_memory");
        if (header.ChunkCount != TensorTransport.ChunkCount((long)header.ByteLength))
            throw new ProtocolException(StatusCode.InvalidArgument,
                $"{what}: chunk_count {header.ChunkCount}, expected {TensorTransport.ChunkCount((long)header.ByteLength)} for {header.ByteLength} bytes in chunks of {TensorTransport.ChunkBytes}", "tensor.chunk_count");
        if (destination is not null && destination.Length != expectedElements)
            throw new ArgumentException($"destination of {destination.Length} floats for {expectedElements} elements");
        if (header.Dtype == DType.Float32) _floats = destination ?? new float[expectedElements];
        else _bytes = new byte[header.ByteLength];
        _received = new bool[header.ChunkCount];
    }

    /// <summary>Shape and byte length against what is expected, for streamed and shared-memory payloads alike.</summary>
    private static void CheckHeader(TensorHeader header, long expectedElements, string what)
    {
        var size = TensorTransport.ElementSize(header.Dtype);
        if (header.Shape.Count != 1 || header.Shape[0] != expectedElements)
            throw new ProtocolException(StatusCode.InvalidArgument,
                $"{what}: shape [{string.Join(",", header.Shape)}], expected [{expectedElements}]", "tensor.shape");
        if (header.ByteLength != (ulong)(expectedElements * size))
            throw new ProtocolException(StatusCode.InvalidArgument,
                $"{what}: byte_length {header.ByteLength}, expected {expectedElements * size} ({expectedElements} elements of {header.Dtype})", "tensor.byte_length");
    }

    /// <summary>
    /// A payload announced as in <paramref name="segment"/>'s <paramref name="region"/>: checks the header, and that the
    /// region holds the write it describes; returns the payload in place. The caller reads it, then calls
    /// <see cref="SharedTensorSegment.ExpectSequence"/> with after: true before it uses what it read.
    /// </summary>
    public static ReadOnlySpan<byte> CheckShared(TensorHeader header, long expectedElements, string what, SharedTensorSegment segment, SharedRegion region)
    {
        CheckHeader(header, expectedElements, what);
        if (!header.SharedMemory)
            throw new ProtocolException(StatusCode.InvalidArgument, $"{what}: the header does not announce a shared-memory payload", "tensor.shared_memory");
        if (header.ChunkCount != 0)
            throw new ProtocolException(StatusCode.InvalidArgument, $"{what}: chunk_count {header.ChunkCount} for a shared-memory payload, expected 0", "tensor.chunk_count");
        var bytes = segment[region];
        if ((long)header.ByteLength > bytes.Length)
            throw new ProtocolException(StatusCode.InvalidArgument, $"{what}: byte_length {header.ByteLength} exceeds the {bytes.Length}-byte shared region", "tensor.byte_length");
        segment.ExpectSequence(region, header.SharedSequence, what);
        return bytes[..(int)header.ByteLength];
    }

    /// <summary>
    /// A shared-memory payload copied out of the region (the other side owns it and may write it again), checked to be
    /// exactly the write the header describes, and decoded to float32.
    /// </summary>
    public static float[] CopyShared(TensorHeader header, long expectedElements, string what, SharedTensorSegment segment, SharedRegion region, float[]? destination = null)
    {
        var payload = CheckShared(header, expectedElements, what, segment, region);
        float[] result;
        if (header.Dtype == DType.Float32)
        {
            result = destination ?? new float[expectedElements];
            if (result.Length != expectedElements) throw new ArgumentException($"destination of {result.Length} floats for {expectedElements} elements");
            payload.CopyTo(MemoryMarshal.AsBytes(result.AsSpan()));
        }
        else
            result = TensorTransport.ToFloat32(payload, header.Dtype);
        segment.ExpectSequence(region, header.SharedSequence, what, after: true);
        return result;
    }

    private Span<byte> Payload => _floats is not null ? MemoryMarshal.AsBytes(_floats.AsSpan()) : _bytes;

    public TensorHeader Header { get; }
    public string What { get; }
    public bool IsComplete => _receivedCount == _received.Length;
    public long BytesReceived { get; private set; }

    /// <summary>Adds a chunk; false when this chunk index was already received (ignored).</summary>
    public bool Add(TensorChunk chunk)
    {
        if (chunk.Step != Header.Step || chunk.ParameterVersion != Header.ParameterVersion)
            throw new ProtocolException(StatusCode.FailedPrecondition,
                $"{What}: chunk for step {chunk.Step} version {chunk.ParameterVersion}, expected step {Header.Step} version {Header.ParameterVersion}", "chunk.step");
        if (chunk.Index >= _received.Length)
            throw new ProtocolException(StatusCode.InvalidArgument,
                $"{What}: chunk index {chunk.Index}, expected 0..{_received.Length - 1}", "chunk.index");
        var offset = (long)chunk.Index * TensorTransport.ChunkBytes;
        var expected = (int)Math.Min(TensorTransport.ChunkBytes, (long)Header.ByteLength - offset);
        if (chunk.Data.Length > TensorTransport.ChunkBytes)
            throw new ProtocolException(StatusCode.ResourceExhausted,
                $"{What}: chunk {chunk.Index} has {chunk.Data.Length} bytes, at most {TensorTransport.ChunkBytes} allowed", "chunk.data");
        if (chunk.Data.Length != expected)
            throw new ProtocolException(StatusCode.InvalidArgument,
                $"{What}: chunk {chunk.Index} has {chunk.Data.Length} bytes, expected {expected}", "chunk.data");
        if (_received[chunk.Index]) return false;
        var destination = Payload.Slice((int)offset, expected);
        var source = chunk.Data.Span;
        if (chunk.Index == _hashed)
        {
            for (var at = 0; at < expected; at += HashBlockBytes)
            {
                var n = Math.Min(HashBlockBytes, expected - at);
                source.Slice(at, n).CopyTo(destination[at..]);
                _hash.Append(destination.Slice(at, n));
            }
            _hashed++;
        }
        else
            source.CopyTo(destination);
        _received[chunk.Index] = true;
        _receivedCount++;
        BytesReceived += expected;
        HashReceivedInOrder();
        return true;
    }

    /// <summary>Adds to the checksum the chunks received since the last one in it, in order, as far as they go.</summary>
    private void HashReceivedInOrder()
    {
        for (; _hashed < _received.Length && _received[_hashed]; _hashed++)
        {
            var offset = (long)_hashed * TensorTransport.ChunkBytes;
            _hash.Append(Payload.Slice((int)offset, (int)Math.Min(TensorTransport.ChunkBytes, (long)Header.ByteLength - offset)));
        }
    }

    /// <summary>The complete payload as float32, after the checksum check (for float32, the receive buffer itself).</summary>
    public float[] ToFloat32()
    {
        if (!IsComplete)
            throw new ProtocolException(StatusCode.InvalidArgument, $"{What}: {_receivedCount} of {_received.Length} chunks received", "chunk");
        HashReceivedInOrder();   // every chunk is in: this completes the checksum (XXH3 in pieces is XXH3 of the whole)
        var sum = _hash.GetCurrentHashAsUInt64();
        if (sum != Header.Checksum)
            throw new ProtocolException(StatusCode.InvalidArgument,
                $"{What}: payload checksum {sum:x16} does not match the header's {Header.Checksum:x16}", "tensor.checksum");
        return _floats ?? TensorTransport.ToFloat32(_bytes, Header.Dtype);
    }
}
