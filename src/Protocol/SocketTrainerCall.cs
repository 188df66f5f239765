using System.Net.Security;
using System.Net.Sockets;
using System.Text;
using DistDiffusion.Protocol.V1;
using Google.Protobuf;
using Grpc.Core;

namespace DistDiffusion.Protocol;

/// <summary>Opens a worker's Trainer stream: over gRPC, or over the worker socket (<see cref="TrainerSocket"/>).</summary>
public delegate Task<AsyncDuplexStreamingCall<WorkerMessage, CoordinatorMessage>> TrainerConnect(Metadata headers, CancellationToken ct);

/// <summary>Which way a worker's Trainer stream travels.</summary>
public enum TrainerTransport
{
    /// <summary>Length-prefixed frames on a TCP (TLS for https) connection to the coordinator's port (<see cref="TrainerSocket"/>).</summary>
    Socket,
    /// <summary>The gRPC call Trainer/Connect (HTTP/2): what any gRPC client can use, and the fallback.</summary>
    Grpc,
}

/// <summary>The names of <see cref="TrainerTransport"/> on command lines (`worker --transport`, `run --worker-transport`).</summary>
public static class TrainerTransports
{
    public static TrainerTransport Parse(string text, string flag) => text.Trim().ToLowerInvariant() switch
    {
        "socket" => TrainerTransport.Socket,
        "grpc" => TrainerTransport.Grpc,
        _ => throw new ArgumentException($"{flag} {text}: expected socket or grpc"),
    };

    public static string Name(TrainerTransport transport) => transport == TrainerTransport.Socket ? "socket" : "grpc";
}

/// <summary>The server at the address answered the worker socket's preface with something else (an HTTP/2-only proxy, another program).</summary>
public sealed class SocketMismatchException(string message) : Exception(message);

/// <summary>
/// The worker's end of the worker socket: the same Trainer stream as the gRPC call (same messages, same statuses as
/// <see cref="RpcException"/>s), so <c>WorkerSession</c> runs unchanged on either.
/// </summary>
public sealed class SocketTrainerCall : IClientStreamWriter<WorkerMessage>, IAsyncStreamReader<CoordinatorMessage>, IDisposable
{
    private readonly Socket _socket;
    private readonly Stream _stream;
    private readonly SocketFrameReader _reader;
    private readonly SocketFrameWriter _writer;
    private Status _status = new(StatusCode.Unknown, "the call has not ended");
    private Metadata _trailers = [];
    private volatile SocketCallState _state = SocketCallState.Handshake;

    private SocketTrainerCall(Socket socket, Stream stream)
    {
        _socket = socket;
        _stream = stream;
        _reader = new SocketFrameReader(stream);
        // Without TLS a chunk's frame header and data leave in one gathered send on the socket itself.
        _writer = new SocketFrameWriter(stream, stream is NetworkStream ? socket : null);
    }

    public SocketCallState State => _state;

    /// <summary>A <see cref="TrainerConnect"/> for the worker socket to <paramref name="address"/>.</summary>
    public static TrainerConnect Connector(Uri address, string? caFile, TimeSpan handshakeTimeout) =>
        async (headers, ct) => (await ConnectAsync(address, caFile, headers, handshakeTimeout, ct).ConfigureAwait(false)).AsCall();

    /// <summary>
    /// Connects, sends the preface and the Hello (the `authorization` value of <paramref name="headers"/>) and waits,
    /// at most <paramref name="handshakeTimeout"/>, for Accepted. A refusal is the coordinator's status as an
    /// <see cref="RpcException"/>; an answer that is no frame of ours is a <see cref="SocketMismatchException"/>.
    /// </summary>
    public static async Task<SocketTrainerCall> ConnectAsync(Uri address, string? caFile, Metadata headers, TimeSpan handshakeTimeout, CancellationToken ct)
    {
        using var limit = CancellationTokenSource.CreateLinkedTokenSource(ct);
        limit.CancelAfter(handshakeTimeout);
        Socket? socket = new(SocketType.Stream, ProtocolType.Tcp);
        Stream? stream = null;
        SocketTrainerCall? call = null;
        try
        {
            await socket.ConnectAsync(address.IdnHost, address.Port, limit.Token).ConfigureAwait(false);
            TrainerSocket.Configure(socket);
            stream = new NetworkStream(socket, ownsSocket: false);
            if (address.Scheme == Uri.UriSchemeHttps)
            {
                var tls = new SslStream(stream, leaveInnerStreamOpen: false);
                stream = tls;
                await tls.AuthenticateAsClientAsync(new SslClientAuthenticationOptions
                {
                    TargetHost = address.IdnHost,
                    // As gRPC's client: a TLS proxy that requires h2 completes the handshake, then answers the preface
                    // with HTTP/2 (a mismatch, so the worker falls back) instead of refusing the handshake.
                    ApplicationProtocols = [SslApplicationProtocol.Http2],
                    RemoteCertificateValidationCallback = ClientChannel.CertificateValidator(caFile),
                }, limit.Token).ConfigureAwait(false);
            }
            call = new SocketTrainerCall(socket, stream);
            (socket, stream) = (null, null);   // the call owns them now
            var authorization = Encoding.UTF8.GetBytes(headers.GetValue(Names.AuthorizationHeader) ?? "");
            if (authorization.Length > TrainerSocket.MaxHelloBytes)
                throw new ArgumentException($"the authorization header is {authorization.Length} bytes, at most {TrainerSocket.MaxHelloBytes} allowed");
            await call._writer.WriteFrameAsync(SocketFrameKind.Hello, authorization, limit.Token, TrainerSocket.Preface).ConfigureAwait(false);
            await call.AwaitAcceptedAsync(address, limit.Token).ConfigureAwait(false);
            var accepted = call;
            call = null;
            return accepted;
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested && call is not null)
        {
            // Connected and sent the preface, but nothing came back: whatever listens there does not speak the socket.
            throw new SocketMismatchException($"{address} did not answer the worker socket's preface within {handshakeTimeout.TotalSeconds:F0} s");
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
            throw new RpcException(new Status(StatusCode.DeadlineExceeded, $"worker socket to {address}: no connection within {handshakeTimeout.TotalSeconds:F0} s"));
        }
        catch (Exception e) when (e is SocketException or IOException or System.Security.Authentication.AuthenticationException)
        {
            throw new RpcException(new Status(StatusCode.Unavailable, $"worker socket to {address}: {e.Message}", e));
        }
        finally
        {
            call?.Dispose();
            if (stream is not null) await stream.DisposeAsync().ConfigureAwait(false);
            socket?.Dispose();
        }
    }

    private async Task AwaitAcceptedAsync(Uri address, CancellationToken ct)
    {
        SocketFrame? answer;
        try
        {
            answer = await _reader.ReadAsync(TrainerSocket.MaxStatusBytes, ct).ConfigureAwait(false);
        }
        catch (Exception e) when (e is ProtocolException or RpcException { StatusCode: StatusCode.ResourceExhausted })
        {
            throw new SocketMismatchException($"{address} answered the worker socket's preface with bytes that are no frame of ours ({e.Message})");
        }
        using var frame = answer ?? throw new RpcException(new Status(StatusCode.Unavailable, $"{address} closed the worker socket before answering it"));
        switch (frame.Kind)
        {
            case SocketFrameKind.Accepted:
                _state = SocketCallState.Streaming;
                return;
            case SocketFrameKind.Status:
                var (status, trailers) = TrainerSocket.DecodeStatus(frame.Body);
                End(status, trailers);
                throw new RpcException(status, trailers);
            default:
                throw new SocketMismatchException($"{address} answered the worker socket's preface with a {frame.Kind} frame, expected Accepted or Status");
        }
    }

    /// <summary>This connection as the call object gRPC would return.</summary>
    public AsyncDuplexStreamingCall<WorkerMessage, CoordinatorMessage> AsCall() =>
        new(this, this, Task.FromResult(new Metadata()), () => _status, () => _trailers, Dispose);

    public CoordinatorMessage Current { get; private set; } = null!;

    public async Task<bool> MoveNext(CancellationToken cancellationToken)
    {
        if (_state == SocketCallState.Closed)
            return _status.StatusCode == StatusCode.OK ? false : throw new RpcException(_status, _trailers);
        SocketFrame? next;
        try
        {
            next = await _reader.ReadAsync(ClientChannel.MaxReceiveMessageBytes, cancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException && !cancellationToken.IsCancellationRequested)
        {
            throw Lost("connection lost: " + e.Message);
        }
        using var frame = next ?? throw Lost("the coordinator closed the connection without a status");
        switch (frame.Kind)
        {
            case SocketFrameKind.Message:
                try
                {
                    Current = TensorMessages.ParseCoordinatorMessage(frame);
                }
                catch (InvalidProtocolBufferException e)
                {
                    throw Lost($"undecodable message from the coordinator: {e.Message}", StatusCode.Internal);
                }
                return true;
            case SocketFrameKind.Status:
                var (status, trailers) = TrainerSocket.DecodeStatus(frame.Body);
                End(status, trailers);
                return status.StatusCode == StatusCode.OK ? false : throw new RpcException(status, trailers);
            default:
                throw Lost($"the coordinator sent a {frame.Kind} frame while streaming", StatusCode.Internal);
        }
    }

    /// <summary>
    /// As a broken gRPC call: this read or write, and every one after it, fails with this status (or the one the call had
    /// already ended with); the connection is closed so the other direction fails at once too.
    /// </summary>
    private RpcException Lost(string detail, StatusCode code = StatusCode.Unavailable)
    {
        if (_state != SocketCallState.Closed) End(new Status(code, detail), []);
        Dispose();
        return new RpcException(_status, _trailers);
    }

    private void End(Status status, Metadata trailers)
    {
        _status = status;
        _trailers = trailers;
        _state = SocketCallState.Closed;
    }

    public WriteOptions? WriteOptions { get; set; }

    public Task WriteAsync(WorkerMessage message) => WriteAsync(message, CancellationToken.None);

    public async Task WriteAsync(WorkerMessage message, CancellationToken cancellationToken)
    {
        if (_state == SocketCallState.Closed) throw new RpcException(_status, _trailers);
        if (_state == SocketCallState.HalfClosed) throw new InvalidOperationException("cannot write on a worker socket after CompleteAsync");
        try
        {
            // The gRPC channel's send limit: what the coordinator accepts is its to say (it ends the call with ResourceExhausted).
            await _writer.WriteMessageAsync(message, ClientChannel.MaxReceiveMessageBytes, cancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException)
        {
            throw Lost("connection lost: " + e.Message);
        }
    }

    public async Task CompleteAsync()
    {
        if (_state != SocketCallState.Streaming) return;
        _state = SocketCallState.HalfClosed;
        try
        {
            await _writer.WriteFrameAsync(SocketFrameKind.HalfClose, [], CancellationToken.None).ConfigureAwait(false);
        }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException)
        {
            throw Lost("connection lost: " + e.Message);
        }
    }

    public void Dispose()
    {
        if (_state != SocketCallState.Closed) End(new Status(StatusCode.Cancelled, "the worker closed the call"), []);
        _stream.Dispose();
        _socket.Dispose();
    }
}
