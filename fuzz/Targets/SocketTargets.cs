using System.Buffers.Binary;
using System.IO.Pipelines;
using System.Net.Sockets;
using System.Net;
using System.Text;
using DistDiffusion.Coordinator.Transport;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Google.Protobuf;
using Grpc.Core;
using Microsoft.AspNetCore.Connections;

namespace DistDiffusion.Fuzz.Targets;

/// <summary>
/// The coordinator's end of the worker socket: the input is every byte a client sends on a connection (the preface, the
/// Hello, frames), read by the very connection middleware Kestrel runs (<see cref="TrainerSocketEndpoint.Middleware"/>)
/// over an in-memory connection, with the real in-process coordinator behind it. A connection that does not open with the
/// preface must go on to HTTP/2 untouched; one that does gets frames back: a Status alone, or Accepted, messages and a Status
/// last, each readable (<see cref="TrainerSocket.DecodeStatus"/>). The training state changes only with an applied push.
/// </summary>
public sealed class SocketCoordinatorTarget : FuzzTarget
{
    public override string Name => "socket-coordinator";

    protected override bool AllThreads => true;

    protected override void Run(byte[] input) => RunAsync(input).GetAwaiter().GetResult();

    private static async Task RunAsync(byte[] input)
    {
        var coordinator = FuzzCoordinator.Instance;
        var before = coordinator.State;
        // Never pause the writer: the coordinator's answers are read after it is done.
        var toServer = new Pipe(new PipeOptions(pauseWriterThreshold: 0, resumeWriterThreshold: 0));
        var toClient = new Pipe(new PipeOptions(pauseWriterThreshold: 0, resumeWriterThreshold: 0));
        await toServer.Writer.WriteAsync(input);
        await toServer.Writer.CompleteAsync();
        var passedOn = false;
        await using var connection = new DefaultConnectionContext("fuzz", new DuplexPipe(toServer.Reader, toClient.Writer), new DuplexPipe(toClient.Reader, toServer.Writer));
        var middleware = TrainerSocketEndpoint.Middleware(() => coordinator.Services)(c =>
        {
            passedOn = true;
            return Task.CompletedTask;
        });
        using (var limit = new CancellationTokenSource(TimeSpan.FromSeconds(30)))
            await middleware(connection).WaitAsync(limit.Token);
        await toClient.Writer.CompleteAsync();
        var output = await ReadAllAsync(toClient.Reader);
        var preface = input.Length >= TrainerSocket.PrefaceBytes && input.AsSpan(0, TrainerSocket.PrefaceBytes).SequenceEqual(TrainerSocket.Preface);
        Check(passedOn == !preface, passedOn ? "socket-coordinator: a connection with the worker socket's preface went on to HTTP/2" : "socket-coordinator: a connection without the preface was not passed on to HTTP/2");
        if (!preface)
        {
            Check(output.Length == 0, $"socket-coordinator: {output.Length} bytes answered to a connection passed on to HTTP/2");
            Note("passed on to HTTP/2");
            return;
        }
        var answers = await ReadAnswersAsync(output);
        if (answers.Messages.FirstOrDefault(m => m.KindCase == CoordinatorMessage.KindOneofCase.Welcome) is { } welcome)
            await coordinator.AwaitGoneAsync(welcome.Welcome.WorkerId);
        await coordinator.BarrierAsync();
        FuzzCoordinator.CheckState("socket-coordinator", before, coordinator.State, answers.Messages);
        Note(answers.Status is { } status ? $"{status.StatusCode}: {status.Detail}" : "no status");
    }

    private static async Task<byte[]> ReadAllAsync(PipeReader reader)
    {
        using var ms = new MemoryStream();
        await reader.CopyToAsync(ms);
        await reader.CompleteAsync();
        return ms.ToArray();
    }

    /// <summary>The frames the coordinator sent: nothing, a Status, or Accepted then messages then a Status.</summary>
    private static async Task<(List<CoordinatorMessage> Messages, Status? Status)> ReadAnswersAsync(byte[] output)
    {
        var reader = new SocketFrameReader(new MemoryStream(output));
        var messages = new List<CoordinatorMessage>();
        Status? status = null;
        var accepted = false;
        var index = 0;
        while (await reader.ReadAsync(ClientChannel.MaxReceiveMessageBytes, CancellationToken.None) is { } frame)
        {
            using (frame)
            {
                Check(status is null, "socket-coordinator: a frame after the Status");
                switch (frame.Kind)
                {
                    case SocketFrameKind.Accepted:
                        Check(index == 0 && frame.Length == 0, "socket-coordinator: Accepted that is not the first frame, or not empty");
                        accepted = true;
                        break;
                    case SocketFrameKind.Message:
                        Check(accepted, "socket-coordinator: a message before Accepted");
                        messages.Add(TensorMessages.ParseCoordinatorMessage(frame));
                        break;
                    case SocketFrameKind.Status:
                        var decoded = TrainerSocket.DecodeStatus(frame.Body).Status;
                        Check(decoded.StatusCode == StatusCode.OK || !string.IsNullOrWhiteSpace(decoded.Detail), $"socket-coordinator: status {decoded.StatusCode} without a detail");
                        Check(decoded.StatusCode != StatusCode.Unknown, $"socket-coordinator: the handler failed ({decoded.Detail})");
                        status = decoded;
                        break;
                    default:
                        throw new FuzzFindingException($"socket-coordinator: the coordinator sent a {frame.Kind} frame");
                }
            }
            index++;
        }
        // A worker that closed before its Hello gets nothing; every other connection ends with a status.
        Check(status is not null || index == 0, "socket-coordinator: the coordinator's frames end without a Status");
        return (messages, status);
    }

    private sealed class DuplexPipe(PipeReader input, PipeWriter output) : IDuplexPipe
    {
        public PipeReader Input { get; } = input;
        public PipeWriter Output { get; } = output;
    }

    protected override bool Expected(Exception e) => false;

    protected override long AllocationLimit(byte[] input) => 16L * input.Length + (64L << 20);

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        static byte[] Frame(SocketFrameKind kind, byte[] body)
        {
            var bytes = new byte[TrainerSocket.FrameHeaderBytes + body.Length];
            TrainerSocket.WriteHeader(bytes, kind, body.Length);
            body.CopyTo(bytes, TrainerSocket.FrameHeaderBytes);
            return bytes;
        }
        var preface = TrainerSocket.Preface.ToArray();
        var hello = Frame(SocketFrameKind.Hello, Encoding.UTF8.GetBytes("Bearer " + FuzzCoordinator.WorkerToken));
        var join = Frame(SocketFrameKind.Message, new WorkerMessage { Join = new Join { Host = "fuzz", Device = "cpu", Threads = 1, ProtocolVersion = Names.ProtocolVersion } }.ToByteArray());
        var heartbeat = Frame(SocketFrameKind.Message, new WorkerMessage { Heartbeat = new Heartbeat { WorkerId = "w1" } }.ToByteArray());
        var chunk = Frame(SocketFrameKind.Message, new WorkerMessage { GradientChunk = new GradientChunk { WorkerId = "w1", Chunk = new TensorChunk { Data = ByteString.CopyFrom(new byte[64]) } } }.ToByteArray());
        var halfClose = Frame(SocketFrameKind.HalfClose, []);
        yield return ("join-half-close", [.. preface, .. hello, .. join, .. heartbeat, .. halfClose]);
        yield return ("join-chunk", [.. preface, .. hello, .. join, .. chunk, .. halfClose]);
        yield return ("client-token", [.. preface, .. Frame(SocketFrameKind.Hello, Encoding.UTF8.GetBytes("Bearer " + FuzzCoordinator.ClientToken)), .. join]);
        yield return ("no-token", [.. preface, .. Frame(SocketFrameKind.Hello, []), .. join]);
        yield return ("preface-only", preface);
        yield return ("http2", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"u8.ToArray());
    }
}

/// <summary>
/// The worker's end of the worker socket (<see cref="SocketTrainerCall"/>): a loopback listener plays the coordinator,
/// reads the preface and Hello, then answers with the input and closes. The worker reads the answer (Accepted or a Status)
/// and then its messages until the stream ends. Documented errors (what the worker catches): RpcException (the status the peer sent),
/// <see cref="ProtocolException"/>,
/// <see cref="SocketMismatchException"/> (no worker socket there).
/// </summary>
public sealed class SocketWorkerTarget : FuzzTarget, IDisposable
{
    private const int MaxMessages = 1024;
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly Uri _address;

    public SocketWorkerTarget()
    {
        _listener.Start();
        _address = new Uri($"http://127.0.0.1:{((IPEndPoint)_listener.LocalEndpoint).Port}");
    }

    public override string Name => "socket-worker";

    protected override bool AllThreads => true;

    protected override void Run(byte[] input) => RunAsync(input).GetAwaiter().GetResult();

    private async Task RunAsync(byte[] input)
    {
        using var limit = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        var serve = ServeAsync(input, limit.Token);
        try
        {
            using var call = await SocketTrainerCall.ConnectAsync(_address, null, Token.Headers("fuzz-token"), TimeSpan.FromSeconds(10), limit.Token);
            Check(call.State == SocketCallState.Streaming, $"socket-worker: connected in state {call.State}");
                        for (var i = 0; i < MaxMessages && await call.MoveNext(limit.Token); i++)
            {
                Check(call.Current is not null, "socket-worker: a null message");
                TensorMessages.Release(call.Current);
            }
        }
        finally
        {
            await serve;
        }
    }

    /// <summary>The coordinator's part: preface, Hello of the announced length, then the input, then close.</summary>
    private async Task ServeAsync(byte[] input, CancellationToken ct)
    {
        using var socket = await _listener.AcceptSocketAsync(ct);
        var head = new byte[TrainerSocket.PrefaceBytes + TrainerSocket.FrameHeaderBytes];
        await ReceiveExactlyAsync(socket, head, ct);
        Check(head.AsSpan(0, TrainerSocket.PrefaceBytes).SequenceEqual(TrainerSocket.Preface), "socket-worker: the worker did not send the preface");
        var hello = new byte[BinaryPrimitives.ReadUInt32LittleEndian(head.AsSpan(TrainerSocket.PrefaceBytes))];
        await ReceiveExactlyAsync(socket, hello, ct);
        try
        {
            await socket.SendAsync(input, SocketFlags.None, ct);
            socket.Shutdown(SocketShutdown.Send);
            // Until the worker closes: closing first could reset the connection before it read the input.
            var scratch = new byte[4096];
            while (await socket.ReceiveAsync(scratch, SocketFlags.None, ct) > 0) { }
        }
        catch (SocketException)
        {
            // the worker gave up first (a reset after it refused the answer)
        }
    }

    private static async Task ReceiveExactlyAsync(Socket socket, byte[] buffer, CancellationToken ct)
    {
        for (var at = 0; at < buffer.Length;)
        {
            var n = await socket.ReceiveAsync(buffer.AsMemory(at), SocketFlags.None, ct);
            if (n == 0) throw new FuzzFindingException("socket-worker: the worker closed inside its preface or Hello");
            at += n;
        }
    }

    // The coordinator's status is the peer's to choose (any code, any detail): the worker passes it on as an RpcException.
    protected override bool Expected(Exception e) => e is RpcException or SocketMismatchException or ProtocolException;

    protected override long AllocationLimit(byte[] input) => 16L * input.Length + (32L << 20);

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        static byte[] Frame(SocketFrameKind kind, byte[] body)
        {
            var bytes = new byte[TrainerSocket.FrameHeaderBytes + body.Length];
            TrainerSocket.WriteHeader(bytes, kind, body.Length);
            body.CopyTo(bytes, TrainerSocket.FrameHeaderBytes);
            return bytes;
        }
        var trailers = new Metadata { { "x-reason", "fuzz" }, { "grpc-status-details-bin", new byte[] { 1, 2, 3 } } };
        var refused = Frame(SocketFrameKind.Status, TrainerSocket.EncodeStatus(new Status(StatusCode.Unauthenticated, "no token"), trailers));
        var ok = Frame(SocketFrameKind.Status, TrainerSocket.EncodeStatus(Status.DefaultSuccess, null));
        var accepted = Frame(SocketFrameKind.Accepted, []);
        var welcome = Frame(SocketFrameKind.Message, new CoordinatorMessage { Welcome = new Welcome { WorkerId = "w1", RecipeJson = "{}", TrainSize = 10 } }.ToByteArray());
        var chunk = Frame(SocketFrameKind.Message, new CoordinatorMessage { ParametersChunk = new TensorChunk { Step = 1, Data = ByteString.CopyFrom(new byte[TensorMessages.PooledMinimumBytes]) } }.ToByteArray());
        yield return ("refused", refused);
        yield return ("accepted-welcome-ok", [.. accepted, .. welcome, .. ok]);
        yield return ("accepted-chunk-refused", [.. accepted, .. chunk, .. refused]);
        yield return ("accepted-eof", accepted);
        yield return ("http2-settings", [0, 0, 0, 4, 0, 0, 0, 0, 0]);
    }

    public void Dispose() => _listener.Dispose();
}
