using System.Buffers;
using System.Buffers.Binary;
using System.Runtime.InteropServices;
using System.Text;
using DistDiffusion.Protocol.V1;
using Google.Protobuf;
using Grpc.Core;

namespace DistDiffusion.Protocol;

/// <summary>Kinds of frame on the worker socket (<see cref="TrainerSocket"/>).</summary>
public enum SocketFrameKind : byte
{
    /// <summary>Worker -> coordinator, once, right after the preface: the `authorization` value (UTF-8, may be empty).</summary>
    Hello = 1,
    /// <summary>Coordinator -> worker, once: the token was accepted and the Trainer stream begins.</summary>
    Accepted = 2,
    /// <summary>Either way: one WorkerMessage or CoordinatorMessage, protobuf-encoded exactly as on the gRPC stream.</summary>
    Message = 3,
    /// <summary>Worker -> coordinator: no more messages (the gRPC request stream's end).</summary>
    HalfClose = 4,
    /// <summary>Coordinator -> worker, last: the call's status and trailers, as gRPC would end it.</summary>
    Status = 5,
}

/// <summary>Where a worker socket is in its protocol (each side keeps one).</summary>
public enum SocketCallState
{
    /// <summary>Connecting, TLS, preface and Hello sent or awaited.</summary>
    Handshake,
    /// <summary>Accepted: messages flow both ways.</summary>
    Streaming,
    /// <summary>The worker half-closed; the coordinator may still write.</summary>
    HalfClosed,
    /// <summary>A status was sent or received, or the connection broke.</summary>
    Closed,
}

/// <summary>
/// The Trainer stream on a plain TCP (or TLS) connection to the coordinator's own port, next to gRPC. .NET's HTTP/2
/// client moves a tensor as 16 KiB DATA frames, each handed between two threads and sent by its own system call, and
/// announces no larger frame size, so a step's megabytes took ~120 such round trips each way (issue 9). Here the same
/// protobuf messages go as length-prefixed frames, one write per message, so a 1 MiB chunk is one system call.
/// <para>Wire format: the worker opens with the 24-byte <see cref="Preface"/> (as long as HTTP/2's), then every frame in both directions is a
/// 4-byte little-endian body length, a <see cref="SocketFrameKind"/> byte and the body. The coordinator's Kestrel tells
/// this preface from HTTP/2's ("PRI * HTTP/2.0...") by its first bytes, so it shares the gRPC port, its TLS and the
/// manifests' Service; the token is checked before anything else is read, with the same roles as the gRPC call.</para>
/// </summary>
public static class TrainerSocket
{
    /// <summary>
    /// The worker's first bytes, as long as HTTP/2's client preface ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 24 bytes): an
    /// HTTP/2 server or proxy waits for that many before it answers, and then answers something that is no frame of ours.
    /// </summary>
    public static ReadOnlySpan<byte> Preface => "DDTRAIN1 worker-socket\r\n"u8;
    public const int PrefaceBytes = 24;
    public const int FrameHeaderBytes = 5;

    /// <summary>
    /// Socket options for a worker socket. Loopback gets 4 MiB buffers, so a 1 MiB frame is one copy rather than waits for
    /// the reader to drain 64-128 KiB at a time; elsewhere the kernel's own sizing stays (fixing a size would turn it
    /// off and cap the window at net.core.rmem_max). On Linux, data unacknowledged for 40 s ends the connection: with
    /// heartbeats in flight keep-alive probes never go out, and a vanished peer would otherwise take ~15 minutes of
    /// retransmissions to notice (gRPC's HTTP/2 pings notice in ~40 s).
    /// </summary>
    public static void Configure(System.Net.Sockets.Socket socket)
    {
        var loopback = socket.RemoteEndPoint is System.Net.IPEndPoint { Address: var ip } && System.Net.IPAddress.IsLoopback(ip);
        socket.NoDelay = true;
        socket.SetSocketOption(System.Net.Sockets.SocketOptionLevel.Socket, System.Net.Sockets.SocketOptionName.KeepAlive, true);
        socket.SetSocketOption(System.Net.Sockets.SocketOptionLevel.Tcp, System.Net.Sockets.SocketOptionName.TcpKeepAliveTime, 20);
        socket.SetSocketOption(System.Net.Sockets.SocketOptionLevel.Tcp, System.Net.Sockets.SocketOptionName.TcpKeepAliveInterval, 5);
        socket.SetSocketOption(System.Net.Sockets.SocketOptionLevel.Tcp, System.Net.Sockets.SocketOptionName.TcpKeepAliveRetryCount, 4);
        if (OperatingSystem.IsLinux())
            socket.SetRawSocketOption(IpProtoTcp, TcpUserTimeout, BitConverter.GetBytes(UserTimeoutMilliseconds));
        if (loopback)
        {
            socket.SendBufferSize = 4 << 20;
            socket.ReceiveBufferSize = 4 << 20;
        }
    }

    private const int IpProtoTcp = 6;
    private const int TcpUserTimeout = 18;   // TCP_USER_TIMEOUT, linux/tcp.h
    public const int UserTimeoutMilliseconds = 40_000;
    /// <summary>Largest Hello body (an authorization header value; Kestrel allows 32 KiB for all of a call's headers).</summary>
    public const int MaxHelloBytes = 16 << 10;
    /// <summary>Largest Status body.</summary>
    public const int MaxStatusBytes = 64 << 10;

    /// <summary>The frame header for a body of <paramref name="length"/> bytes.</summary>
    public static void WriteHeader(Span<byte> destination, SocketFrameKind kind, int length)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(destination, (uint)length);
        destination[4] = (byte)kind;
    }

    /// <summary>A status body: code, detail and trailers (binary ones, such as grpc-status-details-bin, included).</summary>
    public static byte[] EncodeStatus(Status status, Metadata? trailers)
    {
        using var ms = new MemoryStream();
        using (var w = new BinaryWriter(ms, Encoding.UTF8, leaveOpen: true))
        {
            w.Write((int)status.StatusCode);
            w.Write(Truncate(status.Detail ?? "", 16 << 10));
            var entries = trailers?.Where(e => e.Key.Length <= 256).ToList() ?? [];
            w.Write(entries.Count);
            foreach (var e in entries)
            {
                w.Write(e.Key);
                var value = e.IsBinary ? e.ValueBytes : Encoding.UTF8.GetBytes(e.Value);
                w.Write(value.Length);
                w.Write(value);
            }
        }
        var bytes = ms.ToArray();
        return bytes.Length <= MaxStatusBytes ? bytes : EncodeStatus(status, null);
    }

    /// <summary>Reads a status body; a malformed one is a <see cref="ProtocolException"/>.</summary>
    public static (Status Status, Metadata Trailers) DecodeStatus(ReadOnlySpan<byte> body)
    {
        try
        {
            using var ms = new MemoryStream(body.ToArray());
            using var r = new BinaryReader(ms, Encoding.UTF8);
            var code = (StatusCode)r.ReadInt32();
            var detail = r.ReadString();
            var count = r.ReadInt32();
            if (count is < 0 or > 64) throw new InvalidDataException($"{count} trailers");
            var trailers = new Metadata();
            for (var i = 0; i < count; i++)
            {
                var key = r.ReadString();
                var length = r.ReadInt32();
                if (length < 0 || length > ms.Length - ms.Position) throw new InvalidDataException($"trailer {key} of {length} bytes");
                var value = r.ReadBytes(length);
                if (key.EndsWith(Metadata.BinaryHeaderSuffix, StringComparison.Ordinal)) trailers.Add(key, value);
                else trailers.Add(key, Encoding.UTF8.GetString(value));
            }
            return (new Status(code, detail), trailers);
        }
        catch (Exception e) when (e is EndOfStreamException or InvalidDataException or ArgumentException or FormatException)
        {
            throw new ProtocolException(StatusCode.Internal, $"the coordinator's status frame is malformed: {e.Message}");
        }
    }

    private static string Truncate(string text, int max) => text.Length <= max ? text : text[..max];
}

/// <summary>One received frame: its kind and a pooled body that <see cref="Dispose"/> gives back.</summary>
public sealed class SocketFrame : IDisposable
{
    private byte[] _array;

    public SocketFrame(SocketFrameKind kind, byte[] array, int length)
    {
        Kind = kind;
        _array = array;
        Length = length;
    }

    public SocketFrameKind Kind { get; }
    public int Length { get; private set; }
    public ReadOnlySpan<byte> Body => _array.AsSpan(0, Length);
    public ReadOnlySequence<byte> Sequence => new(_array, 0, Length);

    /// <summary>Hands the pooled array to the caller (who returns it to <see cref="ArrayPool{T}.Shared"/>); the frame is empty afterwards.</summary>
    internal byte[] Detach()
    {
        var array = _array;
        _array = [];
        Length = 0;
        return array;
    }

    public void Dispose()
    {
        if (_array.Length > 0) ArrayPool<byte>.Shared.Return(_array);
        _array = [];
    }
}

/// <summary>
/// Reads frames from a stream through a 64 KiB buffer (a small message and the next frame's header usually arrive in
/// one read); a large body beyond what is buffered is read straight into its pooled array.
/// </summary>
public sealed class SocketFrameReader
{
    private readonly Stream _stream;
    private readonly byte[] _buffer = new byte[64 << 10];
    private int _start, _end;

    public SocketFrameReader(Stream stream) => _stream = stream;

    /// <summary>The next frame, or null when the stream ended cleanly between frames.</summary>
    /// <param name="maxBody">A larger announced body is refused with ResourceExhausted before any of it is read.</param>
    public async ValueTask<SocketFrame?> ReadAsync(int maxBody, CancellationToken ct)
    {
        if (!await FillAsync(TrainerSocket.FrameHeaderBytes, ct).ConfigureAwait(false))
        {
            if (_end == _start) return null;
            throw new EndOfStreamException($"the connection closed inside a frame header ({_end - _start} of {TrainerSocket.FrameHeaderBytes} bytes)");
        }
        var length = BinaryPrimitives.ReadUInt32LittleEndian(_buffer.AsSpan(_start));
        var kindByte = _buffer[_start + 4];
        if (kindByte is < (byte)SocketFrameKind.Hello or > (byte)SocketFrameKind.Status)
            throw new ProtocolException(StatusCode.InvalidArgument, $"frame kind {kindByte}: expected 1..5 (not a DistDiffusion worker socket?)", "frame.kind");
        if (length > (uint)maxBody)
            throw new RpcException(new Status(StatusCode.ResourceExhausted, $"frame of {length} bytes: at most {maxBody} allowed"));
        _start += TrainerSocket.FrameHeaderBytes;
        var size = (int)length;
        var array = size == 0 ? [] : ArrayPool<byte>.Shared.Rent(size);
        try
        {
            var have = Math.Min(size, _end - _start);
            _buffer.AsSpan(_start, have).CopyTo(array);
            _start += have;
            if (have < size) await _stream.ReadExactlyAsync(array.AsMemory(have, size - have), ct).ConfigureAwait(false);
            return new SocketFrame((SocketFrameKind)kindByte, array, size);
        }
        catch
        {
            if (size > 0) ArrayPool<byte>.Shared.Return(array);
            throw;
        }
    }

    private async ValueTask<bool> FillAsync(int count, CancellationToken ct)
    {
        if (_end - _start >= count) return true;
        if (_start > 0)
        {
            _buffer.AsSpan(_start, _end - _start).CopyTo(_buffer);
            _end -= _start;
            _start = 0;
        }
        while (_end < count)
        {
            var read = await _stream.ReadAsync(_buffer.AsMemory(_end), ct).ConfigureAwait(false);
            if (read == 0) return false;
            _end += read;
        }
        return true;
    }
}

/// <summary>
/// Writes frames, one send per frame. A message that is one large tensor chunk is not serialized into a buffer: its few
/// dozen bytes of header go out with the chunk's data from where the data lies (<see cref="TensorMessages.TrySplitChunkData"/>),
/// gathered into one system call on a plain TCP socket, or copied once into the coordinator's Kestrel pipe. Like a gRPC
/// stream, it takes one write at a time: callers wait for each.
/// </summary>
public sealed class SocketFrameWriter
{
    private readonly Stream? _stream;
    private readonly System.Net.Sockets.Socket? _socket;
    private readonly System.IO.Pipelines.PipeWriter? _pipe;
    private readonly ArraySegment<byte>[] _gather = new ArraySegment<byte>[2];

    /// <param name="stream">The connection (TLS or plain).</param>
    /// <param name="plainSocket">The socket under <paramref name="stream"/> when nothing sits between them (no TLS): a
    /// chunk's header and data are then one gathered send.</param>
    public SocketFrameWriter(Stream stream, System.Net.Sockets.Socket? plainSocket = null)
    {
        _stream = stream;
        _socket = plainSocket;
    }

    /// <summary>Frames into a connection's output pipe (Kestrel's, after its TLS if any), flushed once per frame.</summary>
    public SocketFrameWriter(System.IO.Pipelines.PipeWriter pipe) => _pipe = pipe;

    /// <summary>A message frame: a large chunk's data sent from where it lies, anything else serialized into a pooled buffer behind its header.</summary>
    public async ValueTask WriteMessageAsync(IMessage message, int maxBody, CancellationToken ct)
    {
        if (TensorMessages.TrySplitChunkData(message, TrainerSocket.FrameHeaderBytes, out var head, out var data))
        {
            var length = head.Length - TrainerSocket.FrameHeaderBytes + data.Length;
            if (length > maxBody)
                throw new RpcException(new Status(StatusCode.ResourceExhausted, $"message of {length} bytes: at most {maxBody} allowed"));
            TrainerSocket.WriteHeader(head, SocketFrameKind.Message, length);
            await WriteAsync(head, data, ct).ConfigureAwait(false);
            return;
        }
        var size = message.CalculateSize();
        if (size > maxBody)
            throw new RpcException(new Status(StatusCode.ResourceExhausted, $"message of {size} bytes: at most {maxBody} allowed"));
        var array = ArrayPool<byte>.Shared.Rent(TrainerSocket.FrameHeaderBytes + size);
        try
        {
            TrainerSocket.WriteHeader(array, SocketFrameKind.Message, size);
            message.WriteTo(array.AsSpan(TrainerSocket.FrameHeaderBytes, size));
            await WriteAsync(array.AsMemory(0, TrainerSocket.FrameHeaderBytes + size), default, ct).ConfigureAwait(false);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(array);
        }
    }

    /// <summary>A frame with the given body (control frames: Hello, Accepted, HalfClose, Status), preceded by <paramref name="prefix"/>.</summary>
    public ValueTask WriteFrameAsync(SocketFrameKind kind, ReadOnlySpan<byte> body, CancellationToken ct, ReadOnlySpan<byte> prefix = default)
    {
        var bytes = new byte[prefix.Length + TrainerSocket.FrameHeaderBytes + body.Length];
        prefix.CopyTo(bytes);
        TrainerSocket.WriteHeader(bytes.AsSpan(prefix.Length), kind, body.Length);
        body.CopyTo(bytes.AsSpan(prefix.Length + TrainerSocket.FrameHeaderBytes));
        return WriteAsync(bytes, default, ct);
    }

    /// <summary><paramref name="first"/> then <paramref name="second"/> (may be empty), as one frame's bytes.</summary>
    private async ValueTask WriteAsync(ReadOnlyMemory<byte> first, ReadOnlyMemory<byte> second, CancellationToken ct)
    {
        if (_pipe is not null)
        {
            _pipe.Write(first.Span);
            if (!second.IsEmpty) _pipe.Write(second.Span);
            // As a stream over the pipe behaves: a closed connection shows on the reading side, a cancelled flush here.
            if ((await _pipe.FlushAsync(ct).ConfigureAwait(false)).IsCanceled)
                throw new OperationCanceledException("the write to the worker socket was cancelled");
            return;
        }
        if (_socket is not null && !second.IsEmpty
            && MemoryMarshal.TryGetArray(first, out var a) && MemoryMarshal.TryGetArray(second, out var b))
        {
            ct.ThrowIfCancellationRequested();
            _gather[0] = a;
            _gather[1] = b;
            // Socket.SendAsync over a buffer list takes no token. A write cancelled inside a frame would leave the stream
            // unreadable anyway, so cancelling closes the connection (which ends the send).
            int sent;
            using (ct.UnsafeRegister(static s => ((System.Net.Sockets.Socket)s!).Dispose(), _socket))
                sent = await _socket.SendAsync(_gather, System.Net.Sockets.SocketFlags.None).ConfigureAwait(false);
            _gather[0] = _gather[1] = default;
            var total = a.Count + b.Count;
            // A stream socket's send completes whole or fails; should it ever return short, the rest goes the ordinary way.
            if (sent < a.Count)
            {
                await _stream!.WriteAsync(first[sent..], ct).ConfigureAwait(false);
                sent = a.Count;
            }
            if (sent < total) await _stream!.WriteAsync(second[(sent - a.Count)..], ct).ConfigureAwait(false);
            return;
        }
        await _stream!.WriteAsync(first, ct).ConfigureAwait(false);
        if (!second.IsEmpty) await _stream.WriteAsync(second, ct).ConfigureAwait(false);
        await _stream.FlushAsync(ct).ConfigureAwait(false);
    }
}
