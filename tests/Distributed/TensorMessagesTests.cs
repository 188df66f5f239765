using System.Buffers;
using DistDiffusion.Coordinator.Training;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Google.Protobuf;
using Grpc.Core;

namespace DistDiffusion.Tests.Distributed;

/// <summary>
/// The Trainer stream's marshallers read chunk payloads into pooled arrays; everything they read must be exactly what
/// the generated parser reads (same messages, same failures), whatever the framing, and other messages must go through it.
/// </summary>
public class TensorMessagesTests
{
    private static byte[] Payload(int bytes) => Enumerable.Range(0, bytes).Select(i => (byte)(i * 13 + 5)).ToArray();

    private static WorkerMessage GradientChunk(int bytes) => new()
    {
        GradientChunk = new GradientChunk
        {
            WorkerId = "w1-abcdef",
            Slice = 2,
            Chunk = new TensorChunk { Step = 7, ParameterVersion = 6, Index = 1, Data = ByteString.CopyFrom(Payload(bytes)) },
        },
    };

    /// <summary>gRPC's view of a received message: its bytes as a sequence of <paramref name="segment"/>-byte pieces (as Kestrel's blocks).</summary>
    private sealed class Received(byte[] bytes, int segment) : DeserializationContext
    {
        public override int PayloadLength => bytes.Length;
        public override byte[] PayloadAsNewBuffer() => bytes.ToArray();
        public override ReadOnlySequence<byte> PayloadAsReadOnlySequence()
        {
            if (bytes.Length == 0) return ReadOnlySequence<byte>.Empty;
            Piece? first = null, last = null;
            for (var o = 0; o < bytes.Length; o += segment)
            {
                var piece = new Piece(bytes.AsMemory(o, Math.Min(segment, bytes.Length - o)), o);
                if (last is null) first = piece; else last.Next = piece;
                last = piece;
            }
            return new ReadOnlySequence<byte>(first!, 0, last!, last!.Memory.Length);
        }

        private sealed class Piece : ReadOnlySequenceSegment<byte>
        {
            public Piece(ReadOnlyMemory<byte> memory, long index)
            {
                Memory = memory;
                RunningIndex = index;
            }

            public new Piece? Next { get => (Piece?)base.Next; set => base.Next = value; }
        }
    }

    private static WorkerMessage ReadWorker(byte[] bytes, int segment = 4096) => TensorMessages.WorkerMessages.ContextualDeserializer(new Received(bytes, segment));
    private static CoordinatorMessage ReadCoordinator(byte[] bytes, int segment = 4096) => TensorMessages.CoordinatorMessages.ContextualDeserializer(new Received(bytes, segment));

    [Theory]
    [InlineData(1 << 20, 4096)]
    [InlineData(1 << 20, 65536)]
    [InlineData((1 << 20) - 12, 1 << 22)]
    [InlineData(100, 7)]   // small: not pooled, still read the same
    public void GradientChunksReadAsTheGeneratedParserReadsThem(int bytes, int segment)
    {
        var wire = GradientChunk(bytes).ToByteArray();
        var read = ReadWorker(wire, segment);
        Assert.Equal(WorkerMessage.Parser.ParseFrom(wire), read);
        TensorMessages.Release(read);
        Assert.True(read.GradientChunk.Chunk.Data.IsEmpty || bytes < TensorMessages.PooledMinimumBytes);
    }

    [Fact]
    public void ParameterChunksReadAsTheGeneratedParserReadsThemAndReleaseEmptiesThem()
    {
        var message = new CoordinatorMessage { ParametersChunk = new TensorChunk { Step = 3, ParameterVersion = 3, Index = 0, Data = ByteString.CopyFrom(Payload(1 << 20)) } };
        var wire = message.ToByteArray();
        var read = ReadCoordinator(wire);
        Assert.Equal(message, read);
        TensorMessages.Release(read);
        Assert.True(read.ParametersChunk.Data.IsEmpty);   // the pooled bytes are no longer reachable through the message
        TensorMessages.Release(read);                     // a second release is harmless
    }

    [Fact]
    public void OtherMessagesAndUnusualFramingsGoThroughTheGeneratedParser()
    {
        var chunk = GradientChunk(1 << 17).ToByteArray();
        var unknown = new byte[] { 0xF8, 0x01, 0x05 };   // field 31, varint 5
        List<byte[]> cases =
        [
            new WorkerMessage { Heartbeat = new Heartbeat { WorkerId = "w1" } }.ToByteArray(),
            [.. chunk, .. chunk],   // the chunk field twice: protobuf merges the two messages
            [.. unknown, .. chunk],   // an unknown field beside it
        ];
        // The data field twice inside the TensorChunk (the last one wins), and an unknown field inside it.
        var inner = new TensorChunk { Step = 1, Index = 0, Data = ByteString.CopyFrom(Payload(1 << 17)) }.ToByteArray();
        var twice = new TensorChunk { Data = ByteString.CopyFrom(Payload(70_000)) }.ToByteArray();
        foreach (var body in new[] { (byte[])[.. inner, .. twice], [.. inner, .. unknown] })
        {
            cases.Add(Field(3, Field(3, body)));   // WorkerMessage { gradient_chunk = GradientChunk { chunk = body } }
        }
        foreach (var wire in cases)
        {
            var read = ReadWorker(wire);
            Assert.Equal(WorkerMessage.Parser.ParseFrom(wire), read);
            TensorMessages.Release(read);
        }
    }

    [Fact]
    public void MalformedMessagesFailAsTheGeneratedParserFails()
    {
        var wire = GradientChunk(1 << 17).ToByteArray();
        foreach (var broken in new[] { wire[..^1], wire[..(wire.Length / 2)], [.. wire, 0x0B] })   // truncated, cut, a stray group tag
        {
            var expected = Assert.ThrowsAny<InvalidProtocolBufferException>(() => WorkerMessage.Parser.ParseFrom(broken));
            var actual = Assert.ThrowsAny<InvalidProtocolBufferException>(() => ReadWorker(broken));
            Assert.Equal(expected.GetType(), actual.GetType());
        }
    }

    [Theory]
    [InlineData(1 << 20, "w1-abcdef", 2u, 7ul, 6ul, 1u)]
    [InlineData((1 << 20) - 12, "", 0u, 0ul, 0ul, 0u)]                                   // every other field at its default: not written
    [InlineData(TensorMessages.PooledMinimumBytes, "w", 300u, ulong.MaxValue, 1ul << 40, 9u)]   // long varints
    public void AChunkSplitForSendingIsByteForByteTheGeneratedSerialization(int bytes, string worker, uint slice, ulong step, ulong version, uint index)
    {
        var chunk = new TensorChunk { Step = step, ParameterVersion = version, Index = index, Data = ByteString.CopyFrom(Payload(bytes)) };
        IMessage[] messages =
        [
            new WorkerMessage { GradientChunk = new GradientChunk { WorkerId = worker, Slice = slice, Chunk = chunk } },
            new CoordinatorMessage { ParametersChunk = chunk },
        ];
        foreach (var message in messages)
        {
            Assert.True(TensorMessages.TrySplitChunkData(message, 5, out var head, out var data));
            Assert.Equal(new byte[5], head[..5]);   // the headroom is left to the caller
            Assert.Equal(message.ToByteArray(), (byte[])[.. head[5..], .. data.ToArray()]);
            Assert.True(chunk.Data.Memory.Span == data.Span);   // the data itself, not a copy
        }
    }

    [Fact]
    public void SmallChunksOtherMessagesAndUnknownFieldsAreNotSplit()
    {
        var small = GradientChunk(TensorMessages.PooledMinimumBytes - 1);
        var heartbeat = new WorkerMessage { Heartbeat = new Heartbeat { WorkerId = "w1" } };
        // A TensorChunk carrying an unknown field (31) is written after its data by the generated code: no cut before the data gives those bytes.
        var withUnknown = new CoordinatorMessage { ParametersChunk = TensorChunk.Parser.ParseFrom([.. new TensorChunk { Index = 1, Data = ByteString.CopyFrom(Payload(1 << 17)) }.ToByteArray(), 0xF8, 0x01, 0x05]) };
        foreach (var message in new IMessage[] { small, heartbeat, withUnknown, new CoordinatorMessage() })
            Assert.False(TensorMessages.TrySplitChunkData(message, 5, out _, out _));
    }

    /// <summary>A hand-framed length-delimited field: tag, varint length, bytes.</summary>
    private static byte[] Field(int number, byte[] value)
    {
        var bytes = new List<byte>();
        foreach (var v in new[] { (ulong)((number << 3) | 2), (ulong)value.Length })
        {
            var rest = v;
            for (; rest >= 0x80; rest >>= 7) bytes.Add((byte)(rest | 0x80));
            bytes.Add((byte)rest);
        }
        bytes.AddRange(value);
        return [.. bytes];
    }
}
