namespace DistDiffusion.Protocol;

/// <summary>
/// A connection stream that receives in large reads and serves smaller ones from its buffer. The HTTP/2 client reads
/// one frame (16 KiB of a tensor chunk) per call, each preceded by a zero-byte wait that becomes a probe call of its
/// own: a few hundred system calls and thread-pool hops per megabyte. Writes go straight through.
/// </summary>
public sealed class ReadAheadStream : Stream
{
    private readonly Stream _inner;
    private readonly byte[] _buffer;
    private int _start, _end;

    public ReadAheadStream(Stream inner, int bufferBytes)
    {
        _inner = inner;
        _buffer = GC.AllocateUninitializedArray<byte>(bufferBytes);
    }

    public override bool CanRead => true;
    public override bool CanSeek => false;
    public override bool CanWrite => _inner.CanWrite;
    public override long Length => throw new NotSupportedException();
    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        if (_end > _start) return Take(buffer.Span);
        // A zero-byte read waits for data without holding a buffer: pass it through.
        if (buffer.Length == 0) return await _inner.ReadAsync(buffer, cancellationToken).ConfigureAwait(false);
        // A read at least as large as the buffer needs no detour through it.
        if (buffer.Length >= _buffer.Length) return await _inner.ReadAsync(buffer, cancellationToken).ConfigureAwait(false);
        var n = await _inner.ReadAsync(_buffer, cancellationToken).ConfigureAwait(false);
        (_start, _end) = (0, n);
        return n == 0 ? 0 : Take(buffer.Span);
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    public override int Read(Span<byte> buffer)
    {
        if (_end > _start) return Take(buffer);
        if (buffer.Length == 0 || buffer.Length >= _buffer.Length) return _inner.Read(buffer);
        var n = _inner.Read(_buffer);
        (_start, _end) = (0, n);
        return n == 0 ? 0 : Take(buffer);
    }

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

    private int Take(Span<byte> destination)
    {
        var n = Math.Min(destination.Length, _end - _start);
        _buffer.AsSpan(_start, n).CopyTo(destination);
        _start += n;
        return n;
    }

    public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default) => _inner.WriteAsync(buffer, cancellationToken);
    public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) => _inner.WriteAsync(buffer, offset, count, cancellationToken);
    public override void Write(ReadOnlySpan<byte> buffer) => _inner.Write(buffer);
    public override void Write(byte[] buffer, int offset, int count) => _inner.Write(buffer, offset, count);
    public override Task FlushAsync(CancellationToken cancellationToken) => _inner.FlushAsync(cancellationToken);
    public override void Flush() => _inner.Flush();
    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
    public override void SetLength(long value) => throw new NotSupportedException();

    protected override void Dispose(bool disposing)
    {
        if (disposing) _inner.Dispose();
        base.Dispose(disposing);
    }
}
