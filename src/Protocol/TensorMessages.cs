using System.Buffers;
using System.Runtime.CompilerServices;
using DistDiffusion.Protocol.V1;
using Google.Protobuf;
using Grpc.Core;

namespace DistDiffusion.Protocol;

/// <summary>
/// The Trainer stream's messages with a cheaper way in for tensor chunks. Google.Protobuf parses a chunk's 1 MiB
/// <c>bytes</c> field into a fresh large-object-heap array (zeroed, then copied into); at hundreds of megabytes a
/// second that allocation, its page faults and the gen-2 collections it forces cost 0.25-0.5 ms per MiB, several
/// times the copy itself. Here a gradient or parameter chunk's payload is copied into a pooled array instead, which
/// the receiver hands back with <see cref="Release(WorkerMessage)"/> once it has copied the bytes into the tensor.
/// <para>The wire format is untouched: messages are written by the generated code, and every message that is not one
/// chunk field in canonical form (each field at most once where it matters, no groups) is read by the generated parser,
/// so what is accepted, rejected or kept as unknown fields is exactly what the generated code does. Other clients
/// interoperate with either side.</para>
/// </summary>
public static class TensorMessages
{
    /// <summary>Payloads smaller than this are not worth pooling: the generated parser's small allocation is cheap.</summary>
    public const int PooledMinimumBytes = 64 << 10;

    private const int LengthDelimited = 2;
    private static readonly ConditionalWeakTable<TensorChunk, byte[]> Pooled = [];

    public static readonly Marshaller<WorkerMessage> WorkerMessages = new(Serialize, DeserializeWorkerMessage);
    public static readonly Marshaller<CoordinatorMessage> CoordinatorMessages = new(Serialize, DeserializeCoordinatorMessage);

    /// <summary>Trainer/Connect with these marshallers (the same method on the wire as the generated one).</summary>
    public static readonly Method<WorkerMessage, CoordinatorMessage> Connect =
        new(MethodType.DuplexStreaming, Trainer.Descriptor.FullName, "Connect", WorkerMessages, CoordinatorMessages);

    /// <summary>Gives a gradient chunk's pooled payload back (no-op for any other message); its data is empty afterwards.</summary>
    public static void Release(WorkerMessage? message)
    {
        if (message?.KindCase == WorkerMessage.KindOneofCase.GradientChunk) Release(message.GradientChunk.Chunk);
    }

    /// <summary>Gives a parameter chunk's pooled payload back (no-op for any other message); its data is empty afterwards.</summary>
    public static void Release(CoordinatorMessage? message)
    {
        if (message?.KindCase == CoordinatorMessage.KindOneofCase.ParametersChunk) Release(message.ParametersChunk);
    }

    private static void Release(TensorChunk? chunk)
    {
        if (chunk is null || !Pooled.TryGetValue(chunk, out var array)) return;
        Pooled.Remove(chunk);
        // Whoever still holds the message sees no bytes rather than bytes the pool has handed to someone else.
        chunk.Data = ByteString.Empty;
        ArrayPool<byte>.Shared.Return(array);
    }

    /// <summary>
    /// A message that is one large tensor chunk (a WorkerMessage's gradient_chunk, a CoordinatorMessage's parameters_chunk,
    /// data of at least <see cref="PooledMinimumBytes"/>), cut where the generated serializer would put the data: the
    /// bytes before it (<paramref name="head"/>, a few dozen after <paramref name="headroom"/> bytes left free for the
    /// caller's framing) and the data itself, so a writer can send the data from where it lies instead of copying it
    /// into a serialization buffer. <c>head[headroom..] + data</c> is byte for byte what
    /// <see cref="MessageExtensions.ToByteArray"/> writes (the data is the last field at each level); a message for which
    /// that cannot be shown from the sizes (unknown fields, say) is not split.
    /// </summary>
    public static bool TrySplitChunkData(IMessage message, int headroom, out byte[] head, out ReadOnlyMemory<byte> data)
    {
        head = [];
        data = default;
        var (outer, chunk) = message switch
        {
            WorkerMessage { KindCase: WorkerMessage.KindOneofCase.GradientChunk, GradientChunk: { Chunk: { } c } g } =>
                (new GradientChunk { WorkerId = g.WorkerId, Slice = g.Slice }, c),
            CoordinatorMessage { KindCase: CoordinatorMessage.KindOneofCase.ParametersChunk, ParametersChunk: { } c } => ((IMessage?)null, c),
            _ => (null, (TensorChunk?)null),
        };
        if (chunk is null || chunk.Data.Length < PooledMinimumBytes) return false;
        var rest = new TensorChunk { Step = chunk.Step, ParameterVersion = chunk.ParameterVersion, Index = chunk.Index };
        var length = chunk.Data.Length;
        // Sizes with the data included. TensorChunk: its other fields, then data (4) as tag, length, bytes.
        var chunkSize = rest.CalculateSize() + Tagged(TensorChunk.DataFieldNumber, length);
        // GradientChunk: worker_id and slice, then chunk (3); all of it field 3 of the WorkerMessage.
        var outerSize = outer is null ? 0 : outer.CalculateSize() + Tagged(GradientChunk.ChunkFieldNumber, chunkSize);
        var headSize = (outer is null
            ? Tagged(CoordinatorMessage.ParametersChunkFieldNumber, chunkSize)
            : Tagged(WorkerMessage.GradientChunkFieldNumber, outerSize)) - length;
        if (headSize + length != message.CalculateSize()) return false;
        var bytes = new byte[headroom + headSize];
        var at = headroom;
        if (outer is not null)
        {
            at = WriteField(bytes, at, WorkerMessage.GradientChunkFieldNumber, outerSize);
            at = WriteMessage(bytes, at, outer);
            at = WriteField(bytes, at, GradientChunk.ChunkFieldNumber, chunkSize);
        }
        else
            at = WriteField(bytes, at, CoordinatorMessage.ParametersChunkFieldNumber, chunkSize);
        at = WriteMessage(bytes, at, rest);
        at = WriteField(bytes, at, TensorChunk.DataFieldNumber, length);
        if (at != bytes.Length) return false;
        head = bytes;
        data = chunk.Data.Memory;
        return true;
    }

    /// <summary>A length-delimited field's tag and length at <paramref name="at"/>; where its body begins.</summary>
    private static int WriteField(byte[] bytes, int at, int field, int length)
    {
        at = WriteVarint(bytes, at, (uint)((field << 3) | LengthDelimited));
        return WriteVarint(bytes, at, (uint)length);
    }

    private static int WriteMessage(byte[] bytes, int at, IMessage message)
    {
        var size = message.CalculateSize();
        message.WriteTo(bytes.AsSpan(at, size));
        return at + size;
    }

    private static int WriteVarint(byte[] bytes, int at, uint value)
    {
        for (; value >= 0x80; value >>= 7) bytes[at++] = (byte)(value | 0x80);
        bytes[at++] = (byte)value;
        return at;
    }

    /// <summary>Bytes of a length-delimited field <paramref name="field"/> with a body of <paramref name="length"/> bytes: tag, length, body.</summary>
    private static int Tagged(int field, int length) =>
        CodedOutputStream.ComputeTagSize(field) + CodedOutputStream.ComputeLengthSize(length) + length;

    /// <summary>As the generated marshaller writes a message: straight into gRPC's buffer.</summary>
    private static void Serialize<T>(T message, SerializationContext context) where T : IBufferMessage
    {
        context.SetPayloadLength(message.CalculateSize());
        message.WriteTo(context.GetBufferWriter());
        context.Complete();
    }

    private static WorkerMessage DeserializeWorkerMessage(DeserializationContext context) => ParseWorkerMessage(context.PayloadAsReadOnlySequence());

    private static CoordinatorMessage DeserializeCoordinatorMessage(DeserializationContext context) => ParseCoordinatorMessage(context.PayloadAsReadOnlySequence());

    /// <summary>A WorkerMessage as the gRPC marshaller reads it (a gradient chunk's data into a pooled array); also the worker socket's.</summary>
    public static WorkerMessage ParseWorkerMessage(ReadOnlySequence<byte> payload) => TryGradientChunk(payload, null) ?? WorkerMessage.Parser.ParseFrom(payload);

    /// <summary>A WorkerMessage in a worker-socket frame: a large gradient chunk's data stays in the frame's pooled array, which becomes the chunk's (no copy).</summary>
    public static WorkerMessage ParseWorkerMessage(SocketFrame frame) => TryGradientChunk(frame.Sequence, frame) ?? WorkerMessage.Parser.ParseFrom(frame.Sequence);

    /// <summary>A CoordinatorMessage in a worker-socket frame: a large parameter chunk's data stays in the frame's pooled array, which becomes the chunk's (no copy).</summary>
    public static CoordinatorMessage ParseCoordinatorMessage(SocketFrame frame) => TryParametersChunk(frame.Sequence, frame) ?? CoordinatorMessage.Parser.ParseFrom(frame.Sequence);

    /// <summary>A CoordinatorMessage as the gRPC marshaller reads it (a parameter chunk's data into a pooled array); also the worker socket's.</summary>
    public static CoordinatorMessage ParseCoordinatorMessage(ReadOnlySequence<byte> payload) => TryParametersChunk(payload, null) ?? CoordinatorMessage.Parser.ParseFrom(payload);

    /// <summary>WorkerMessage { gradient_chunk (3) = GradientChunk { ..., chunk (3) = TensorChunk { ..., data (4) } } }.</summary>
    private static WorkerMessage? TryGradientChunk(ReadOnlySequence<byte> payload, SocketFrame? frame)
    {
        if (!OnlyField(payload, WorkerMessage.GradientChunkFieldNumber, out var body)) return null;
        if (!SplitField(body, GradientChunk.ChunkFieldNumber, out var before, out var inner, out var after)) return null;
        if (TryTensorChunk(inner, frame) is not { } chunk) return null;
        var gradientChunk = GradientChunk.Parser.ParseFrom(Concat(before, after));
        gradientChunk.Chunk = chunk;
        return new WorkerMessage { GradientChunk = gradientChunk };
    }

    /// <summary>CoordinatorMessage { parameters_chunk (3) = TensorChunk { ..., data (4) } }.</summary>
    private static CoordinatorMessage? TryParametersChunk(ReadOnlySequence<byte> payload, SocketFrame? frame)
    {
        if (!OnlyField(payload, CoordinatorMessage.ParametersChunkFieldNumber, out var body)) return null;
        return TryTensorChunk(body, frame) is { } chunk ? new CoordinatorMessage { ParametersChunk = chunk } : null;
    }

    /// <summary>
    /// A TensorChunk whose data field occurs exactly once and is large: the other fields through the generated parser
    /// (the data field taken out changes nothing else, as it occurs once), the data copied into a pooled array.
    /// </summary>
    private static TensorChunk? TryTensorChunk(ReadOnlySequence<byte> body, SocketFrame? frame)
    {
        if (!SplitField(body, TensorChunk.DataFieldNumber, out var before, out var data, out var after)) return null;
        if (data.Length < PooledMinimumBytes) return null;
        var chunk = TensorChunk.Parser.ParseFrom(Concat(before, after));
        var length = (int)data.Length;
        if (frame is not null)
        {
            // The frame's sequence is its one array: the data is already there, at this index.
            var offset = data.Start.GetInteger();
            var owned = frame.Detach();
            chunk.Data = UnsafeByteOperations.UnsafeWrap(owned.AsMemory(offset, length));
            Pooled.AddOrUpdate(chunk, owned);
            return chunk;
        }
        var array = ArrayPool<byte>.Shared.Rent(length);
        data.CopyTo(array);
        chunk.Data = UnsafeByteOperations.UnsafeWrap(array.AsMemory(0, length));
        Pooled.AddOrUpdate(chunk, array);
        return chunk;
    }

    /// <summary>The message is exactly one length-delimited field <paramref name="field"/> spanning all of it; its contents.</summary>
    private static bool OnlyField(ReadOnlySequence<byte> payload, int field, out ReadOnlySequence<byte> body)
    {
        body = default;
        var reader = new SequenceReader<byte>(payload);
        if (!ReadVarint(ref reader, out var tag) || tag != (ulong)((field << 3) | LengthDelimited)) return false;
        if (!ReadVarint(ref reader, out var length) || length != (ulong)reader.Remaining) return false;
        body = payload.Slice(reader.Position);
        return true;
    }

    /// <summary>
    /// Walks a message's fields: true when field <paramref name="field"/> occurs exactly once, length-delimited, and every
    /// field is well-formed (no groups); the bytes before its tag, its contents, and the bytes after it.
    /// </summary>
    private static bool SplitField(ReadOnlySequence<byte> message, int field, out ReadOnlySequence<byte> before, out ReadOnlySequence<byte> value, out ReadOnlySequence<byte> after)
    {
        before = value = after = default;
        var found = false;
        var reader = new SequenceReader<byte>(message);
        while (!reader.End)
        {
            var tagStart = reader.Consumed;
            if (!ReadVarint(ref reader, out var tag) || tag >> 3 == 0 || tag >> 3 > int.MaxValue) return false;
            var wireType = (int)(tag & 7);
            if ((int)(tag >> 3) == field)
            {
                if (found || wireType != LengthDelimited) return false;
                if (!ReadVarint(ref reader, out var length) || length > (ulong)reader.Remaining) return false;
                before = message.Slice(0, tagStart);
                value = message.Slice(reader.Consumed, (long)length);
                reader.Advance((long)length);
                after = message.Slice(reader.Consumed);
                found = true;
                continue;
            }
            if (!SkipValue(ref reader, wireType)) return false;
        }
        return found;
    }

    private static bool SkipValue(ref SequenceReader<byte> reader, int wireType)
    {
        switch (wireType)
        {
            case 0:
                return ReadVarint(ref reader, out _);
            case 1:
                return Skip(ref reader, 8);
            case LengthDelimited:
                return ReadVarint(ref reader, out var length) && length <= (ulong)reader.Remaining && Skip(ref reader, (long)length);
            case 5:
                return Skip(ref reader, 4);
            default:
                return false;   // groups and invalid wire types: the generated parser decides
        }
    }

    private static bool Skip(ref SequenceReader<byte> reader, long count)
    {
        if (reader.Remaining < count) return false;
        reader.Advance(count);
        return true;
    }

    private static bool ReadVarint(ref SequenceReader<byte> reader, out ulong value)
    {
        value = 0;
        for (var shift = 0; shift < 64; shift += 7)
        {
            if (!reader.TryRead(out var b)) return false;
            value |= (ulong)(b & 0x7F) << shift;
            if (b < 0x80) return true;
        }
        return false;
    }

    private static byte[] Concat(ReadOnlySequence<byte> first, ReadOnlySequence<byte> second)
    {
        var bytes = new byte[first.Length + second.Length];
        first.CopyTo(bytes);
        second.CopyTo(bytes.AsSpan((int)first.Length));
        return bytes;
    }
}
