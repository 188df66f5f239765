using System.Runtime.InteropServices;
using DistDiffusion.Model.Training;
using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;
using Grpc.Core;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Distributed;

public class TransportTests
{
    private static byte[] Payload(int bytes) => Enumerable.Range(0, bytes).Select(i => (byte)(i * 31 + 7)).ToArray();

    [Theory]
    [InlineData(4)]
    [InlineData(1 << 20)]
    [InlineData((1 << 20) + 4)]
    [InlineData(3 * (1 << 20) - 8)]
    public void ChunksAreAtMostOneMebibyteAndReassembleExactly(int bytes)
    {
        var payload = Payload(bytes);
        var header = TensorTransport.Header(payload, DType.Float32, bytes / 4, 3, 4);
        var chunks = TensorTransport.Chunks(payload, 3, 4).ToList();
        Assert.Equal((int)header.ChunkCount, chunks.Count);
        Assert.All(chunks, c => Assert.InRange(c.Data.Length, 1, TensorTransport.ChunkBytes));
        // Any order: in order (hashed as they come), reversed, and the first one last (the rest wait for it).
        var n = chunks.Count;
        foreach (var order in new[] { Enumerable.Range(0, n), Enumerable.Range(0, n).Reverse(), [.. Enumerable.Range(1, n - 1), 0] })
        {
            var assembler = new TensorAssembler(header, bytes / 4, "t");
            foreach (var i in order) Assert.True(assembler.Add(chunks[i]));
            Assert.False(assembler.Add(chunks[0]));   // a duplicate is ignored
            Assert.Equal(MemoryMarshal.Cast<byte, float>(payload).ToArray(), assembler.ToFloat32());
        }
    }

    /// <summary>
    /// The wire's checksum is XXH3 64-bit with seed 0 (protocol 3), what a client in another language must compute: the
    /// empty input's value is the XXH3 specification's; the 4 KiB value pins today's bytes against a silent change of algorithm.
    /// </summary>
    [Fact]
    public void TheChecksumIsXxh3OfThePayloadBytes()
    {
        Assert.Equal(0x2d06800538d394c2UL, TensorTransport.Checksum(ReadOnlySpan<byte>.Empty));
        var payload = Enumerable.Range(0, 4096).Select(i => (byte)(i % 251)).ToArray();
        Assert.Equal(0x7135ffa504f1bc71UL, TensorTransport.Checksum(payload));
        Assert.Equal(TensorTransport.Checksum(payload), TensorTransport.Header(payload, DType.Float32, 1024, 0, 0).Checksum);
        Assert.Equal(TensorTransport.Checksum(payload), TensorTransport.Checksum(MemoryMarshal.Cast<byte, float>(payload)));
    }

    [Theory]
    [InlineData(4096, 0, 100)]
    [InlineData(3 * (1 << 20) - 8, 2, 100_000)]   // the last of three chunks, past the first hashed block
    [InlineData(3 * (1 << 20) - 8, 1, 1)]
    public void ACorruptedChunkFailsTheChecksum(int bytes, int corrupt, int at)
    {
        var payload = Payload(bytes);
        var header = TensorTransport.Header(payload, DType.Float32, bytes / 4, 0, 0);
        var assembler = new TensorAssembler(header, bytes / 4, "t");
        var chunks = TensorTransport.Chunks(payload, 0, 0).ToList();
        var bad = chunks[corrupt].Data.ToByteArray();
        bad[at] ^= 0x40;
        chunks[corrupt].Data = Google.Protobuf.ByteString.CopyFrom(bad);
        foreach (var c in chunks) assembler.Add(c);
        var e = Assert.Throws<ProtocolException>(() => assembler.ToFloat32());
        Assert.Equal(StatusCode.InvalidArgument, e.Code);
        Assert.Contains("checksum", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void HeadersThatDisagreeWithTheExpectedTensorAreRefused()
    {
        var header = TensorTransport.Header(Payload(400), DType.Float32, 100, 0, 0);
        Assert.Equal(StatusCode.InvalidArgument, Assert.Throws<ProtocolException>(() => new TensorAssembler(header, 101, "t")).Code);
        header.ByteLength = 404;
        Assert.Equal(StatusCode.InvalidArgument, Assert.Throws<ProtocolException>(() => new TensorAssembler(header, 100, "t")).Code);
    }

    [Fact]
    public void BFloat16KeepsEightBitsOfMantissaAndRoundsToNearestEven()
    {
        float[] values = [1f, -2.5f, 3.14159f, 1e-20f, 65504f, 0f, float.NaN, 1.00390625f, 1.01171875f];
        var back = TensorTransport.ToFloat32(TensorTransport.ToBFloat16(values), DType.Bfloat16);
        Assert.Equal(1f, back[0]);
        Assert.Equal(-2.5f, back[1]);
        Assert.InRange(Math.Abs(back[2] - 3.14159f) / 3.14159f, 0, 1.0 / 256);
        Assert.InRange(back[3] / 1e-20f, 1 - 1.0 / 256, 1 + 1.0 / 256);
        Assert.True(float.IsNaN(back[6]));
        Assert.Equal(1f, back[7]);              // halfway between 1 and 1+2^-7: ties to even (1)
        Assert.Equal(1.015625f, back[8]);       // halfway between 1+2^-7 and 1+2^-6: ties to even (1+2^-6)
    }

    [Fact]
    public void ParameterVectorRoundTripsValuesAndGradientsWithPresence()
    {
        using var scope = NewDisposeScope();
        var a = nn.Linear(3, 4);
        var b = nn.Linear(4, 2);
        var named = a.named_parameters().Select(p => ("a." + p.name, (Tensor)p.parameter)).Concat(b.named_parameters().Select(p => ("b." + p.name, (Tensor)p.parameter))).ToList();
        var v = new ParameterVector(named);
        Assert.Equal(3 * 4 + 4 + 4 * 2 + 2, v.Elements);
        var values = v.ReadValues();
        var floats = MemoryMarshal.Cast<byte, float>(values).ToArray();
        Assert.Equal(a.weight!.data<float>().ToArray(), floats[..12]);
        var changed = floats.Select(f => f + 1).ToArray();
        v.WriteValues(changed);
        Assert.Equal(changed, MemoryMarshal.Cast<byte, float>(v.ReadValues()).ToArray());

        // Only a's parameters get gradients: presence bits 0 and 1 set, b's zeros.
        a.forward(ones(2, 3)).sum().backward();
        var (grad, present) = v.ReadGradients();
        Assert.Equal(0b0011, present[0]);
        var g = MemoryMarshal.Cast<byte, float>(grad).ToArray();
        Assert.All(g[16..], x => Assert.Equal(0f, x));
        Assert.Equal(2f, g[12]);   // d/d bias of sum over 2 rows

        // Writing gradients sets only the present ones; b keeps none.
        a.zero_grad(set_to_none: true);
        v.WriteGradients(g, present);
        Assert.NotNull(a.bias!.grad);
        Assert.Null(b.bias!.grad);
        Assert.Equal(2f, a.bias!.grad!.data<float>()[0]);
    }
}
