using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;
using Grpc.Core;

namespace DistDiffusion.Tests.Distributed;

/// <summary>The shared-memory segment: what a worker accepts, and what the coordinator checks on its own copy.</summary>
public sealed class SharedMemoryTests
{
    private const long Region = 4096;

    [Fact]
    public void AWorkerMapsOnlyTheOfferedSegmentWithItsNonceAndSize()
    {
        if (!SharedTensorSegment.Supported || !OperatingSystem.IsLinux()) return;   // no /dev/shm: the stream is the only path
        using var made = SharedTensorSegment.TryCreate(Region, out var reason) ?? throw new InvalidOperationException(reason);
        Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(made.Path));
        Assert.Null(SharedTensorSegment.TryOpen(made.Path, made.Nonce ^ 1, Region, out reason));
        Assert.Contains("nonce", reason, StringComparison.Ordinal);
        Assert.Null(SharedTensorSegment.TryOpen(made.Path, made.Nonce, Region * 2, out reason));
        Assert.Contains("bytes", reason, StringComparison.Ordinal);
        Assert.Null(SharedTensorSegment.TryOpen("/etc/passwd", made.Nonce, Region, out reason));
        Assert.Contains("is not a /dev/shm/distdiffusion-", reason, StringComparison.Ordinal);
        Assert.Null(SharedTensorSegment.TryOpen("/dev/shm/distdiffusion-../../etc/passwd", made.Nonce, Region, out reason));
        Assert.Null(SharedTensorSegment.TryOpen("/dev/shm/distdiffusion-gone", made.Nonce, Region, out reason));
        Assert.Contains("does not exist", reason, StringComparison.Ordinal);

        using var mapped = SharedTensorSegment.TryOpen(made.Path, made.Nonce, Region, out reason) ?? throw new InvalidOperationException(reason);
        made.Unlink();
        Assert.False(File.Exists(made.Path));   // nothing left behind, both mappings still work
        mapped.Gradients[17] = 42;
        Assert.Equal(42, made.Gradients[17]);
        made.Parameters[5] = 7;
        Assert.Equal(7, mapped.Parameters[5]);
    }

    [Fact]
    public void TheCoordinatorChecksAGradientOnItsOwnCopy()
    {
        var region = new byte[Region];
        var values = Enumerable.Range(0, 16).Select(i => i * 0.5f).ToArray();
        System.Runtime.InteropServices.MemoryMarshal.AsBytes(values.AsSpan()).CopyTo(region);
        var header = TensorTransport.Header(region.AsSpan(0, 64), DType.Float32, 16, 3, 3);
        header.SharedMemory = true;
        header.ChunkCount = 0;
        Assert.Equal(values, TensorAssembler.CopyShared(header, 16, "gradient", region));

        region[8] ^= 1;   // the worker changed the bytes after announcing them
        var e = Assert.Throws<ProtocolException>(() => TensorAssembler.CopyShared(header, 16, "gradient", region));
        Assert.Equal(StatusCode.InvalidArgument, e.Code);
        Assert.Contains("checksum", e.Message, StringComparison.Ordinal);

        header.ByteLength = Region * 2;
        e = Assert.Throws<ProtocolException>(() => TensorAssembler.CopyShared(header, 16, "gradient", region));
        Assert.Equal("tensor.byte_length", e.Field);
        // A header that says "shared memory" on a connection without a segment goes nowhere near the stream path.
        header.ByteLength = 64;
        e = Assert.Throws<ProtocolException>(() => new TensorAssembler(header, 16, "gradient"));
        Assert.Equal(StatusCode.FailedPrecondition, e.Code);
    }

    [Fact]
    public void PooledBuffersAreReusedNotReallocated()
    {
        var pool = new TensorBufferPool(1000);
        var first = pool.Rent();
        pool.Return(first);
        Assert.Same(first, pool.Rent());
        Assert.Equal(1, pool.Allocated);
        Assert.Throws<ArgumentException>(() => pool.Return(new float[999]));
    }
}
