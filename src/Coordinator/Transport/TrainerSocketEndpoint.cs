using System.Buffers;
using System.IO.Pipelines;
using System.Net.Sockets;
using System.Text;
using DistDiffusion.Coordinator.Access;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Google.Protobuf;
using Grpc.Core;
using Microsoft.AspNetCore.Connections.Features;
using Microsoft.AspNetCore.Connections;

namespace DistDiffusion.Coordinator.Transport;

/// <summary>
/// The coordinator's end of the worker socket (<see cref="TrainerSocket"/>): a connection middleware on the gRPC
/// listener, after TLS. A connection whose first bytes are the worker socket's preface is served here; any other
/// (HTTP/2) goes on to Kestrel untouched, nothing consumed. The Hello's token is checked as <see cref="AccessMiddleware"/>
/// checks a gRPC call's (the worker role, nothing read before it), then the very <see cref="TrainerService.Connect"/>
/// the gRPC call runs serves the stream, and its outcome goes back as a Status frame.
/// </summary>
public sealed class TrainerSocketEndpoint(IServiceProvider services, ServerCredentials credentials, CoordinatorOptions options, ILogger<TrainerSocketEndpoint> log)
{
    private const string Method = "/distdiffusion.v1.Trainer/Connect";

    /// <summary>The middleware for a listener; <paramref name="services"/> is read per connection (it exists once the app is built).</summary>
    public static Func<ConnectionDelegate, ConnectionDelegate> Middleware(Func<IServiceProvider> services) =>
        next => connection => RouteAsync(connection, next, services);

    private static async Task RouteAsync(ConnectionContext connection, ConnectionDelegate next, Func<IServiceProvider> services)
    {
        var input = connection.Transport.Input;
        ReadResult read;
        using (var limit = new CancellationTokenSource(AccessMiddleware.OpenCallLimit))
        {
            try
            {
                // Both HTTP/2 and the worker socket begin with the client's bytes: this waits for no one who is speaking.
                read = await input.ReadAtLeastAsync(TrainerSocket.PrefaceBytes, limit.Token);
            }
            catch (OperationCanceledException) when (limit.IsCancellationRequested)
            {
                connection.Abort(new ConnectionAbortedException($"fewer than {TrainerSocket.PrefaceBytes} bytes sent within {AccessMiddleware.OpenCallLimit.TotalSeconds:F0} s"));
                return;
            }
            catch (Exception e) when (e is IOException or OperationCanceledException)
            {
                return;   // reset or aborted before saying anything: nothing to serve, nothing worth an error in the log
            }
        }
        var buffer = read.Buffer;
        if (buffer.Length < TrainerSocket.PrefaceBytes || !IsPreface(buffer.Slice(0, TrainerSocket.PrefaceBytes)))
        {
            input.AdvanceTo(buffer.Start);   // nothing consumed or examined: Kestrel's HTTP/2 reads it all again
            await next(connection);
            return;
        }
        input.AdvanceTo(buffer.GetPosition(TrainerSocket.PrefaceBytes));
        await services().GetRequiredService<TrainerSocketEndpoint>().ServeAsync(connection);
    }

    private static bool IsPreface(ReadOnlySequence<byte> first)
    {
        Span<byte> bytes = stackalloc byte[TrainerSocket.PrefaceBytes];
        first.CopyTo(bytes);
        return bytes.SequenceEqual(TrainerSocket.Preface);
    }

    private async Task ServeAsync(ConnectionContext connection)
    {
        var peer = connection.RemoteEndPoint?.ToString() ?? "unknown";
        try
        {
            if (connection.Features.Get<IConnectionSocketFeature>()?.Socket is { } socket)
                TrainerSocket.Configure(socket);
        }
        catch (SocketException e)
        {
            log.LogDebug("Worker socket from {Peer}: socket options not set ({Error})", peer, e.Message);
        }
        await using var inputStream = connection.Transport.Input.AsStream(leaveOpen: true);
        var reader = new SocketFrameReader(inputStream);
        var writer = new SocketFrameWriter(connection.Transport.Output);
        try
        {
            if (await RefusalAsync(reader, peer) is { } refusal)
            {
                await EndAsync(writer, refusal, null);
                return;
            }
            await writer.WriteFrameAsync(SocketFrameKind.Accepted, [], connection.ConnectionClosed);
            var requests = new RequestStream(reader);
            var responses = new ResponseStream(writer);
            var (status, trailers) = await RunAsync(connection, requests, responses, peer);
            // The handler may have given up on a write or a read (a worker that stopped reading, a Join that never came)
            // without ending it: the pipe takes one of each at a time, so wait for them briefly, else cut the connection.
            if (!await responses.IdleAsync(TimeSpan.FromSeconds(5)))
            {
                connection.Abort(new ConnectionAbortedException("the worker stopped reading"));
                return;
            }
            await EndAsync(writer, status, trailers);
            // A worker may still be writing what we stopped reading (a refused push): closing now would reset the
            // connection and could destroy the status in flight. With the output still open (completing it closes the
            // socket), read and drop its bytes until it closes, briefly.
            if (requests.Idle) await DrainAsync(inputStream);
        }
        catch (Exception e) when (e is IOException or OperationCanceledException or ObjectDisposedException or InvalidOperationException)
        {
            log.LogDebug("Worker socket from {Peer} ended: {Error}", peer, e.Message);
        }
        finally
        {
            await connection.Transport.Output.CompleteAsync();
        }
    }

    /// <summary>Reads the Hello (within <see cref="AccessMiddleware.OpenCallLimit"/>) and checks its token: null when admitted.</summary>
    private async Task<Status?> RefusalAsync(SocketFrameReader reader, string peer)
    {
        SocketFrame? hello;
        using (var limit = new CancellationTokenSource(AccessMiddleware.OpenCallLimit))
        {
            try
            {
                hello = await reader.ReadAsync(TrainerSocket.MaxHelloBytes, limit.Token);
            }
            catch (Exception e) when (e is ProtocolException or RpcException)
            {
                return new Status(StatusCode.InvalidArgument, $"worker socket: expected a Hello frame of at most {TrainerSocket.MaxHelloBytes} bytes after the preface ({e.Message})");
            }
        }
        using var frame = hello ?? throw new IOException("closed before the Hello");
        if (frame.Kind != SocketFrameKind.Hello)
            return new Status(StatusCode.InvalidArgument, $"worker socket: first frame is {frame.Kind}, expected Hello");
        if (credentials.Open) return null;
        string authorization;
        try
        {
            authorization = new UTF8Encoding(false, true).GetString(frame.Body);
        }
        catch (DecoderFallbackException)
        {
            return new Status(StatusCode.InvalidArgument, "worker socket: the Hello's authorization value is not UTF-8");
        }
        var roles = credentials.RolesOf(authorization.Length == 0 ? null : authorization);
        if (roles == Roles.None)
        {
            var given = authorization.Length == 0 ? "no token" : "a wrong token";
            log.LogWarning("Unauthenticated call to {Method} from {Peer}: {Given}", Method, peer, given);
            return new Status(StatusCode.Unauthenticated,
                $"'{Method}' (worker socket): {given}; send 'authorization: Bearer <token>' (the coordinator's --worker-token-file or --token-file)");
        }
        if ((roles & Roles.Worker) == 0)
        {
            var has = AccessRules.Describe(roles);
            log.LogWarning("Refused {Method} from {Peer}: the token has {Roles}", Method, peer, has);
            return new Status(StatusCode.PermissionDenied,
                $"'{Method}' (worker socket) needs the worker role; this token has {has} (workers present the coordinator's --worker-token-file)");
        }
        return null;
    }

    /// <summary>The Trainer stream itself: <see cref="TrainerService.Connect"/> on frames; its outcome as gRPC would report it.</summary>
    private async Task<(Status, Metadata?)> RunAsync(ConnectionContext connection, RequestStream requests, ResponseStream responses, string peer)
    {
        var service = ActivatorUtilities.CreateInstance<TrainerService>(services);
        var context = new SocketCallContext(Method, peer, connection.ConnectionClosed);
        try
        {
            await service.Connect(requests, responses, context);
            return (Status.DefaultSuccess, context.ResponseTrailers);
        }
        catch (RpcException e)
        {
            return (e.Status, e.Trailers);
        }
        catch (Exception e) when (e is IOException or OperationCanceledException)
        {
            return (new Status(StatusCode.Unavailable, "connection lost: " + e.Message), null);
        }
#pragma warning disable CA1031 // as gRPC does: a handler's unexpected exception ends the call with Unknown, logged here
        catch (Exception e)
#pragma warning restore CA1031
        {
            log.LogError(e, "Worker socket handler failed for {Peer}", peer);
            return (new Status(StatusCode.Unknown, "Exception was thrown by handler."), null);
        }
    }

    private static async Task DrainAsync(Stream input)
    {
        using var limit = new CancellationTokenSource(TimeSpan.FromSeconds(2));
        var scratch = ArrayPool<byte>.Shared.Rent(64 << 10);
        try
        {
            long total = 0;
            int read;
            while (total < 64 << 20 && (read = await input.ReadAsync(scratch, limit.Token)) > 0) total += read;
        }
        catch (Exception e) when (e is IOException or OperationCanceledException or ObjectDisposedException)
        {
            // gone or still talking: either way the status was given its chance
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(scratch);
        }
    }

    private async Task EndAsync(SocketFrameWriter writer, Status status, Metadata? trailers)
    {
        using var limit = new CancellationTokenSource(TimeSpan.FromSeconds(Math.Max(1, options.CallTimeoutSeconds)));
        await writer.WriteFrameAsync(SocketFrameKind.Status, TrainerSocket.EncodeStatus(status, trailers), limit.Token);
    }

    /// <summary>The worker's messages, as gRPC's request stream yields them (Release pooled chunks the same way).</summary>
    private sealed class RequestStream(SocketFrameReader reader) : IAsyncStreamReader<WorkerMessage>
    {
        private bool _ended;
        private Task _last = Task.CompletedTask;

        public WorkerMessage Current { get; private set; } = null!;

        /// <summary>No read is in progress (one the handler stopped waiting for may still be).</summary>
        public bool Idle => _last.IsCompleted;

        public Task<bool> MoveNext(CancellationToken cancellationToken)
        {
            var next = ReadAsync(cancellationToken);
            _last = next;
            return next;
        }

        private async Task<bool> ReadAsync(CancellationToken cancellationToken)
        {
            if (_ended) return false;
            SocketFrame? next;
            try
            {
                next = await reader.ReadAsync(TrainerService.MaxReceiveMessageBytes, cancellationToken);
            }
            catch (ProtocolException e)
            {
                // As gRPC reports a frame it cannot read: a status from the read itself, whichever message it was.
                throw new RpcException(new Status(e.Code, e.Message));
            }
            if (next is null) throw new IOException("the worker closed the connection without ending its stream");
            using var frame = next;
            switch (frame.Kind)
            {
                case SocketFrameKind.Message:
                    try
                    {
                        Current = TensorMessages.ParseWorkerMessage(frame);
                    }
                    catch (InvalidProtocolBufferException e)
                    {
                        throw new RpcException(new Status(StatusCode.InvalidArgument, $"undecodable WorkerMessage: {e.Message}"));
                    }
                    return true;
                case SocketFrameKind.HalfClose:
                    _ended = true;
                    return false;
                default:
                    throw new RpcException(new Status(StatusCode.InvalidArgument, $"frame kind {frame.Kind} on the worker socket, expected Message or HalfClose"));
            }
        }
    }

    private sealed class ResponseStream(SocketFrameWriter writer) : IServerStreamWriter<CoordinatorMessage>
    {
        private Task _last = Task.CompletedTask;

        public WriteOptions? WriteOptions { get; set; }

        public Task WriteAsync(CoordinatorMessage message) => WriteAsync(message, CancellationToken.None);

        public Task WriteAsync(CoordinatorMessage message, CancellationToken cancellationToken)
        {
            var write = writer.WriteMessageAsync(message, ClientChannel.MaxReceiveMessageBytes, cancellationToken).AsTask();
            _last = write;
            return write;
        }

        /// <summary>Whether the last write (one the handler may have stopped waiting for) has ended, waiting up to <paramref name="limit"/>.</summary>
        public async Task<bool> IdleAsync(TimeSpan limit)
        {
            try
            {
                await _last.WaitAsync(limit);
            }
            catch (TimeoutException)
            {
                return false;
            }
            catch (Exception e) when (e is IOException or OperationCanceledException or InvalidOperationException or RpcException)
            {
                // it ended, badly: the pipe is free
            }
            return true;
        }
    }

    /// <summary>What <see cref="TrainerService.Connect"/> reads of its context: the peer and the connection's end.</summary>
    internal sealed class SocketCallContext(string method, string peer, CancellationToken closed) : ServerCallContext
    {
        private readonly Metadata _trailers = [];
        private Status _status;
        private WriteOptions? _writeOptions;

        protected override string MethodCore => method;
        protected override string HostCore => "";
        protected override string PeerCore => peer;
        protected override DateTime DeadlineCore => DateTime.MaxValue;
        protected override Metadata RequestHeadersCore => [];
        protected override CancellationToken CancellationTokenCore => closed;
        protected override Metadata ResponseTrailersCore => _trailers;
        protected override Status StatusCore { get => _status; set => _status = value; }
        protected override WriteOptions? WriteOptionsCore { get => _writeOptions; set => _writeOptions = value; }
        protected override AuthContext AuthContextCore => new(null, []);
        protected override ContextPropagationToken CreatePropagationTokenCore(ContextPropagationOptions? options) =>
            throw new NotSupportedException("the worker socket propagates no context");
        protected override Task WriteResponseHeadersAsyncCore(Metadata responseHeaders) => Task.CompletedTask;
    }
}
