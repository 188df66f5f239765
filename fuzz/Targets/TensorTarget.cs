using System.Buffers.Binary;
using System.Buffers;
using System.IO.Hashing;
using System.Runtime.InteropServices;
using DistDiffusion.Coordinator.Training;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Google.Protobuf;

namespace DistDiffusion.Fuzz.Targets;

/// <summary>
/// Tensors on the wire. The first byte picks one of two parts:
/// <list type="bullet">
/// <item>even: chunk reassembly (<see cref="TensorAssembler"/>). Then a little-endian u32, the elements the receiver expects
/// (at most 2^20), then length-delimited messages: one <see cref="TensorHeader"/> and the <see cref="TensorChunk"/>s that
/// follow it. A chunk whose data has 5 bytes stands for data of (u32 length, at most 1 MiB + 16) copies of its fifth byte,
/// so that inputs of a few bytes reach full 1 MiB chunks; a header checksum of 1 stands for the checksum of the chunks' data
/// in index order. A tensor that assembles must decode to exactly the bytes sent.</item>
/// <item>odd: the pooled parse of WorkerMessage and CoordinatorMessage (<see cref="TensorMessages"/>), against the generated
/// parser: both must refuse, or both read the same message. Then a u32 offset, a u32 count (at most 2 MiB) and a byte: that
/// many copies of the byte are put into the rest of the input at the offset, so that a chunk's data reaches the 64 KiB
/// where pooling begins. A message that splits (<see cref="TensorMessages.TrySplitChunkData"/>) must join to its serialized bytes.</item>
/// </list>
/// Documented errors: <see cref="ProtocolException"/> (with a status and a message), <see cref="InvalidProtocolBufferException"/>.
/// </summary>
public sealed class TensorTarget : FuzzTarget
{
    public const int MaxExpectedElements = 1 << 20;
    private const int MaxFill = 2 << 20;
    private long _limit;

    public override string Name => "tensor";

    protected override void Run(byte[] input)
    {
        _limit = 16L * input.Length + (8 << 20);
        if (input.Length < 5) return;
        if ((input[0] & 1) == 0) Assemble(input.AsSpan(1));
        else CompareParsers(input.AsSpan(1));
    }

    private void Assemble(ReadOnlySpan<byte> input)
    {
        var expected = (long)Math.Min(BinaryPrimitives.ReadUInt32LittleEndian(input), MaxExpectedElements);
        using var messages = new CodedInputStream(input[4..].ToArray());
        var header = new TensorHeader();
        messages.ReadMessage(header);
        var chunks = new List<TensorChunk>();
        while (!messages.IsAtEnd)
        {
            var chunk = new TensorChunk();
            messages.ReadMessage(chunk);
            if (chunk.Data.Length == 5)
            {
                var length = (int)Math.Min(BinaryPrimitives.ReadUInt32LittleEndian(chunk.Data.Span), TensorTransport.ChunkBytes + 16);
                var fill = new byte[length];
                fill.AsSpan().Fill(chunk.Data[4]);
                chunk.Data = UnsafeByteOperations.UnsafeWrap(fill);
            }
            chunks.Add(chunk);
        }
        // The receiver's buffers: the float32 tensor (or the bfloat16 bytes and their decoded copy), the harness's copy.
        _limit += 3 * 4 * expected + chunks.Sum(c => 2L * c.Data.Length);
        if (header.Checksum == 1)
        {
            var hash = new XxHash3();
            foreach (var c in chunks.DistinctBy(c => c.Index).OrderBy(c => c.Index)) hash.Append(c.Data.Span);
            header.Checksum = hash.GetCurrentHashAsUInt64();
        }
        var assembler = new TensorAssembler(header, expected, "fuzzed tensor");
        foreach (var c in chunks) assembler.Add(c);
        var values = assembler.ToFloat32();
        // Accepted: the bytes sent, chunk by chunk in index order, decoded.
        var sent = chunks.DistinctBy(c => c.Index).OrderBy(c => c.Index).SelectMany(c => c.Data.ToByteArray()).ToArray();
        var decoded = TensorTransport.ToFloat32(sent, header.Dtype);
        Check(values.Length == expected, $"tensor: {values.Length} values assembled, {expected} expected");
        Check(MemoryMarshal.AsBytes(values.AsSpan()).SequenceEqual(MemoryMarshal.AsBytes(decoded.AsSpan())), "tensor: the assembled values are not the bytes sent");
    }

    private void CompareParsers(ReadOnlySpan<byte> input)
    {
        if (input.Length < 9) return;
        var rest = input[9..];
        var at = (int)Math.Min(BinaryPrimitives.ReadUInt32LittleEndian(input), (uint)rest.Length);
        var count = (int)Math.Min(BinaryPrimitives.ReadUInt32LittleEndian(input[4..]), MaxFill);
        var payload = new byte[rest.Length + count];
        rest[..at].CopyTo(payload);
        payload.AsSpan(at, count).Fill(input[8]);
        rest[at..].CopyTo(payload.AsSpan(at + count));
        // Six parses (generated, pooled from a sequence and from a frame, for each message type). Google.Protobuf allocates
        // up to ~17 times a payload's size for one parse of it (measured: 2 MiB of small repeated or unknown fields).
        _limit += 6 * 33L * payload.Length;
        Compare(payload, WorkerMessage.Parser, TensorMessages.ParseWorkerMessage, TensorMessages.ParseWorkerMessage, m => TensorMessages.Release(m));
        Compare(payload, CoordinatorMessage.Parser, TensorMessages.ParseCoordinatorMessage, TensorMessages.ParseCoordinatorMessage, m => TensorMessages.Release(m));
    }

    private static void Compare<T>(byte[] payload, MessageParser<T> generated, Func<ReadOnlySequence<byte>, T> pooled, Func<SocketFrame, T> framed, Action<T> release)
        where T : class, IMessage<T>
    {
        T? reference = null;
        string? refused = null;
        try
        {
            reference = generated.ParseFrom(payload);
        }
        catch (InvalidProtocolBufferException e)
        {
            refused = e.Message;
        }
        foreach (var way in new[] { "sequence", "frame" })
        {
            T? mine = null;
            try
            {
                if (way == "sequence") mine = pooled(new ReadOnlySequence<byte>(payload));
                else
                {
                    var array = ArrayPool<byte>.Shared.Rent(Math.Max(1, payload.Length));
                    payload.CopyTo(array, 0);
                    using var frame = new SocketFrame(SocketFrameKind.Message, array, payload.Length);
                    mine = framed(frame);
                }
            }
            catch (InvalidProtocolBufferException e)
            {
                Check(refused is not null, $"tensor: the pooled parse ({way}) refused a {typeof(T).Name} the generated parser reads: {e.Message}");
                continue;
            }
            try
            {
                Check(refused is null, $"tensor: the pooled parse ({way}) read a {typeof(T).Name} the generated parser refuses ({refused})");
                Check(mine!.Equals(reference), $"tensor: the pooled parse ({way}) read another {typeof(T).Name} than the generated parser");
                if (TensorMessages.TrySplitChunkData(mine, 5, out var head, out var data))
                    Check(head.AsSpan(5).ToArray().Concat(data.ToArray()).SequenceEqual(mine.ToByteArray()), $"tensor: a split {typeof(T).Name} does not join to its bytes");
            }
            finally
            {
                if (mine is not null) release(mine);
            }
        }
    }

    protected override bool Expected(Exception e) => e is ProtocolException or InvalidProtocolBufferException;

    protected override long AllocationLimit(byte[] input) => _limit;

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        static byte[] Assembly(long elements, DType dtype, int byteLength, Func<TensorHeader, IEnumerable<TensorChunk>> chunks, ulong checksum = 1)
        {
            var header = new TensorHeader { Step = 3, ParameterVersion = 4, Dtype = dtype, Shape = { elements }, ByteLength = (ulong)byteLength, Checksum = checksum, ChunkCount = TensorTransport.ChunkCount(byteLength) };
            using var ms = new MemoryStream();
            ms.WriteByte(0);
            var count = new byte[4];
            BinaryPrimitives.WriteUInt32LittleEndian(count, (uint)elements);
            ms.Write(count);
            using var output = new CodedOutputStream(ms, leaveOpen: true);
            output.WriteMessage(header);
            foreach (var c in chunks(header)) output.WriteMessage(c);
            output.Flush();
            return ms.ToArray();
        }
        static TensorChunk Chunk(uint index, byte[] data) => new() { Step = 3, ParameterVersion = 4, Index = index, Data = ByteString.CopyFrom(data) };
        static byte[] Fill(int length, byte value) { var b = new byte[5]; BinaryPrimitives.WriteUInt32LittleEndian(b, (uint)length); b[4] = value; return b; }
        var small = Enumerable.Range(0, 64).Select(i => (byte)(i * 7)).ToArray();
        yield return ("float32-one-chunk", Assembly(16, DType.Float32, 64, _ => [Chunk(0, small)]));
        yield return ("bfloat16-one-chunk", Assembly(32, DType.Bfloat16, 64, _ => [Chunk(0, small)]));
        const int big = (TensorTransport.ChunkBytes / 4) + 100;
        yield return ("float32-two-chunks-reversed", Assembly(big, DType.Float32, big * 4, _ => [Chunk(1, Fill(400, 9)), Chunk(0, Fill(TensorTransport.ChunkBytes, 1))]));
        yield return ("float32-duplicate", Assembly(16, DType.Float32, 64, _ => [Chunk(0, small), Chunk(0, small)]));
        yield return ("float32-bad-checksum", Assembly(16, DType.Float32, 64, _ => [Chunk(0, small)], checksum: 12345));
        // Pooled parsing: a gradient chunk and a parameter chunk of 64 KiB + 1, their data taken out and put back by the harness.
        const int pooled = TensorMessages.PooledMinimumBytes + 1;
        foreach (var (name, message) in new (string, IMessage)[]
        {
            ("worker-gradient-chunk", new WorkerMessage { GradientChunk = new GradientChunk { WorkerId = "w1", Slice = 2, Chunk = new TensorChunk { Step = 3, ParameterVersion = 4, Index = 0, Data = ByteString.CopyFrom(new byte[pooled]) } } }),
            ("coordinator-parameters-chunk", new CoordinatorMessage { ParametersChunk = new TensorChunk { Step = 3, ParameterVersion = 4, Index = 1, Data = ByteString.CopyFrom(new byte[pooled]) } }),
            ("worker-heartbeat", new WorkerMessage { Heartbeat = new Heartbeat { WorkerId = "w1" } }),
        })
        {
            var bytes = message.ToByteArray();
            var cut = bytes.Length > pooled ? bytes.Length - pooled : bytes.Length;
            var seed = new byte[10 + cut];
            seed[0] = 1;
            BinaryPrimitives.WriteUInt32LittleEndian(seed.AsSpan(1), (uint)cut);
            BinaryPrimitives.WriteUInt32LittleEndian(seed.AsSpan(5), bytes.Length > pooled ? (uint)pooled : 0);
            bytes.AsSpan(0, cut).CopyTo(seed.AsSpan(10));
            yield return (name, seed);
        }
    }
}
