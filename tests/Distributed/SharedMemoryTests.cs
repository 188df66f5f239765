using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;
using Grpc.Core;

namespace DistDiffusion.Tests.Distributed;

/// <summary>The shared-memory segment: what a worker accepts, and how a reader knows it copied exactly the announced write.</summary>
public sealed class SharedMemoryTests
{
    private const long Region = 4096;

    [SharedMemoryFact]
    [System.Runtime.Versioning.SupportedOSPlatform("linux")]   // SharedMemoryFact skips it elsewhere
    public void AWorkerMapsOnlyTheOfferedSegmentWithItsNonceAndSize()
    {
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
        mapped[SharedRegion.Gradients][17] = 42;
        Assert.Equal(42, made[SharedRegion.Gradients][17]);
        made[SharedRegion.Parameters][5] = 7;
        Assert.Equal(7, mapped[SharedRegion.Parameters][5]);
    }

    [SharedMemoryFact]
    public void AReaderTakesExactlyTheWriteItsHeaderDescribes()
    {
        using var coordinator = SharedTensorSegment.TryCreate(Region, out var reason) ?? throw new InvalidOperationException(reason);
        using var worker = SharedTensorSegment.TryOpen(coordinator.Path, coordinator.Nonce, Region, out reason) ?? throw new InvalidOperationException(reason);
        var values = Enumerable.Range(0, 16).Select(i => i * 0.5f).ToArray();
        var bytes = System.Runtime.InteropServices.MemoryMarshal.AsBytes(values.AsSpan()).ToArray();
        var sequence = worker.Write(SharedRegion.Gradients, bytes);
        Assert.True(sequence > 0 && sequence % 2 == 0);
        Assert.Equal(sequence, coordinator.SequenceOf(SharedRegion.Gradients));
        Assert.Equal(0UL, coordinator.SequenceOf(SharedRegion.Parameters));   // the regions count their own writes
        var header = TensorTransport.SharedHeader(bytes.Length, DType.Float32, 16, 3, 3, sequence);
        Assert.Equal(values, TensorAssembler.CopyShared(header, 16, "gradient", coordinator, SharedRegion.Gradients));

        // The worker wrote again after announcing the first write: the header no longer describes the region.
        var next = worker.Write(SharedRegion.Gradients, bytes);
        Assert.Equal(sequence + 2, next);
        var e = Assert.Throws<ProtocolException>(() => TensorAssembler.CopyShared(header, 16, "gradient", coordinator, SharedRegion.Gradients));
        Assert.Equal(StatusCode.InvalidArgument, e.Code);
        Assert.Equal("tensor.shared_sequence", e.Field);
        Assert.Contains($"holds write {next}, the header describes write {sequence}", e.Message, StringComparison.Ordinal);

        // A write in progress is never read.
        header.SharedSequence = next;
        worker.BeginWrite(SharedRegion.Gradients);
        e = Assert.Throws<ProtocolException>(() => TensorAssembler.CopyShared(header, 16, "gradient", coordinator, SharedRegion.Gradients));
        Assert.Contains("is being written", e.Message, StringComparison.Ordinal);
        header.SharedSequence = worker.EndWrite(SharedRegion.Gradients);

        // A write that starts while the reader copies is caught by the check after the copy.
        _ = TensorAssembler.CheckShared(header, 16, "gradient", coordinator, SharedRegion.Gradients);
        worker.BeginWrite(SharedRegion.Gradients);
        e = Assert.Throws<ProtocolException>(() => coordinator.ExpectSequence(SharedRegion.Gradients, header.SharedSequence, "gradient", after: true));
        Assert.Contains("was written while it was read", e.Message, StringComparison.Ordinal);
        worker.EndWrite(SharedRegion.Gradients);

        // Sequences that no finished write has.
        foreach (var bad in new ulong[] { 0, 7 })
        {
            header.SharedSequence = bad;
            e = Assert.Throws<ProtocolException>(() => TensorAssembler.CopyShared(header, 16, "gradient", coordinator, SharedRegion.Gradients));
            Assert.Contains($"shared_sequence {bad}, expected the even, nonzero sequence", e.Message, StringComparison.Ordinal);
        }

        header.SharedSequence = coordinator.SequenceOf(SharedRegion.Gradients);
        header.ByteLength = Region * 2;
        e = Assert.Throws<ProtocolException>(() => TensorAssembler.CopyShared(header, 16, "gradient", coordinator, SharedRegion.Gradients));
        Assert.Equal("tensor.byte_length", e.Field);
        // A header that says "shared memory" on a connection without a segment goes nowhere near the stream path.
        header.ByteLength = 64;
        e = Assert.Throws<ProtocolException>(() => new TensorAssembler(header, 16, "gradient"));
        Assert.Equal(StatusCode.FailedPrecondition, e.Code);
    }

    /// <summary>
    /// A writer rewrites a 1 MiB region as fast as it can while a reader copies it out: every copy the reader keeps is
    /// one whole write (all its floats carry that write's number), never a mix of two; the others are refused.
    /// </summary>
    [SharedMemoryFact(Timeout = 30_000)]
    public async Task CopiesTakenWhileTheRegionIsRewrittenAreWholeWritesOrRefused()
    {
        const int elements = 1 << 18;
        using var reader = SharedTensorSegment.TryCreate(elements * 4, out var reason) ?? throw new InvalidOperationException(reason);
        using var writer = SharedTensorSegment.TryOpen(reader.Path, reader.Nonce, elements * 4, out reason) ?? throw new InvalidOperationException(reason);
        var header = TensorTransport.SharedHeader(elements * 4, DType.Float32, elements, 1, 1, writer.Write(SharedRegion.Gradients, new byte[elements * 4]));
        using var stop = new CancellationTokenSource();
        var writing = Task.Run(() =>
        {
            var floats = new float[elements];
            for (var n = 1; !stop.IsCancellationRequested; n++)
            {
                Array.Fill(floats, n);
                // The header the "stream" carries: the sequence of the last finished write.
                Volatile.Write(ref _announced, (long)writer.Write(SharedRegion.Gradients, System.Runtime.InteropServices.MemoryMarshal.AsBytes(floats.AsSpan())));
            }
        });
        int whole = 0, refused = 0;
        var copy = new float[elements];
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (clock.Elapsed < TimeSpan.FromSeconds(1) || whole < 20)
        {
            header.SharedSequence = (ulong)Volatile.Read(ref _announced);
            if (header.SharedSequence == 0) continue;
            try
            {
                TensorAssembler.CopyShared(header, elements, "gradient", reader, SharedRegion.Gradients, copy);
            }
            catch (ProtocolException e) when (e.Field == "tensor.shared_sequence")
            {
                refused++;
                continue;
            }
            var first = copy[0];
            var other = Array.FindIndex(copy, v => v != first);
            Assert.True(other < 0, $"a copy mixed two writes: element 0 is from write {first}, element {other} from another");
            whole++;
        }
        await stop.CancelAsync();
        await writing;
        Assert.True(whole >= 20, $"only {whole} whole copies ({refused} refused)");
    }

    private static long _announced;

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
