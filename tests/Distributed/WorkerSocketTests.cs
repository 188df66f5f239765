using System.Net.Sockets;
using System.Net;
using System.Text;
using DistDiffusion.Coordinator.Access;
using DistDiffusion.Coordinator.Training;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Google.Protobuf;
using Grpc.Core;

namespace DistDiffusion.Tests.Distributed;

/// <summary>
/// The worker socket: its frames, its token check (the gRPC call's roles, before anything else is read), sharing the
/// gRPC port with HTTP/2, and what a peer that breaks the framing gets. Training over it, and hostile pushes over it,
/// are in <see cref="DistributedTrainingTests"/> and <see cref="HostileInputTests"/> (each run on both transports).
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class WorkerSocketTests() : TempFolderTest("dd-socket")
{
    private static readonly ServerCredentials Roles = new(null, Cluster.WorkerToken, Cluster.ClientToken);

    [Fact]
    public async Task FramesRoundTripAndAStatusKeepsItsBinaryTrailers()
    {
        using var wire = new MemoryStream();
        var writer = new SocketFrameWriter(wire);
        var message = new WorkerMessage { Heartbeat = new Heartbeat { WorkerId = "w1-abc" } };
        var chunk = new WorkerMessage { GradientChunk = new GradientChunk { WorkerId = "w1-abc", Slice = 2, Chunk = new TensorChunk { Step = 5, Index = 1, Data = ByteString.CopyFrom(Enumerable.Range(0, 100_000).Select(i => (byte)i).ToArray()) } } };
        await writer.WriteMessageAsync(message, 1 << 20, CancellationToken.None);
        await writer.WriteMessageAsync(chunk, 1 << 20, CancellationToken.None);
        await writer.WriteFrameAsync(SocketFrameKind.HalfClose, [], CancellationToken.None);
        var trailers = new Metadata { { "grpc-status-details-bin", new byte[] { 0, 1, 2, 255 } }, { "note", "é ok" } };
        await writer.WriteFrameAsync(SocketFrameKind.Status, TrainerSocket.EncodeStatus(new Status(StatusCode.InvalidArgument, "slice 3: bad"), trailers), CancellationToken.None);

        wire.Position = 0;
        var reader = new SocketFrameReader(wire);
        using (var f = await reader.ReadAsync(1 << 20, CancellationToken.None))
        {
            Assert.Equal(SocketFrameKind.Message, f!.Kind);
            Assert.Equal(message, TensorMessages.ParseWorkerMessage(f.Sequence));
        }
        using (var f = await reader.ReadAsync(1 << 20, CancellationToken.None))
        {
            var parsed = TensorMessages.ParseWorkerMessage(f!);
            Assert.Equal(chunk.GradientChunk.Chunk.Data, parsed.GradientChunk.Chunk.Data);   // a large chunk: its data left in the frame's array
            Assert.Equal(0, f!.Length);                                                        // ... which is the chunk's now
            Assert.Equal(2u, parsed.GradientChunk.Slice);
            TensorMessages.Release(parsed);
        }
        using (var f = await reader.ReadAsync(1 << 20, CancellationToken.None)) Assert.Equal(SocketFrameKind.HalfClose, f!.Kind);
        using (var f = await reader.ReadAsync(1 << 20, CancellationToken.None))
        {
            var (status, back) = TrainerSocket.DecodeStatus(f!.Body);
            Assert.Equal(StatusCode.InvalidArgument, status.StatusCode);
            Assert.Equal("slice 3: bad", status.Detail);
            Assert.Equal(new byte[] { 0, 1, 2, 255 }, back.GetValueBytes("grpc-status-details-bin"));
            Assert.Equal("é ok", back.GetValue("note"));
        }
        Assert.Null(await reader.ReadAsync(1 << 20, CancellationToken.None));   // a clean end between frames
    }

    /// <summary>
    /// What the three ways of writing put on the wire (a stream, a plain TCP socket with its chunks' data gathered into
    /// one send, a connection's pipe as the coordinator's Kestrel gives it) reads back as the same frames, each over a real
    /// connection or pipe, with large chunks of both directions among small messages.
    /// </summary>
    [Fact(Timeout = 30_000)]
    public async Task EveryWayOfWritingPutsTheSameFramesOnTheWire()
    {
        var data = ByteString.CopyFrom(Enumerable.Range(0, 1 << 20).Select(i => (byte)(i * 7)).ToArray());
        IMessage[] messages =
        [
            new WorkerMessage { Heartbeat = new Heartbeat { WorkerId = "w1-abc" } },
            new WorkerMessage { GradientChunk = new GradientChunk { WorkerId = "w1-abc", Slice = 3, Chunk = new TensorChunk { Step = 9, ParameterVersion = 8, Index = 0, Data = data } } },
            new CoordinatorMessage { ParametersChunk = new TensorChunk { Step = 9, ParameterVersion = 9, Index = 1, Data = UnsafeByteOperations.UnsafeWrap(data.Memory[..300_000]) } },
            new WorkerMessage { GradientChunk = new GradientChunk { WorkerId = "w1-abc", Slice = 3, Chunk = new TensorChunk { Step = 9, Index = 1, Data = UnsafeByteOperations.UnsafeWrap(data.Memory[..1000]) } } },
        ];
        var expected = messages.Select(m => m.ToByteArray()).ToList();

        async Task<List<byte[]>> ReadAll(Stream input)
        {
            var reader = new SocketFrameReader(input);
            var bodies = new List<byte[]>();
            for (var i = 0; i < messages.Length; i++)
            {
                using var f = await reader.ReadAsync(2 << 20, CancellationToken.None);
                Assert.Equal(SocketFrameKind.Message, f!.Kind);
                bodies.Add(f.Body.ToArray());
            }
            return bodies;
        }

        // A plain TCP socket, written as a worker writes it (chunks gathered into one send).
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        using var client = new Socket(SocketType.Stream, ProtocolType.Tcp);
        await client.ConnectAsync(IPAddress.Loopback, ((IPEndPoint)listener.LocalEndpoint).Port);
        using var server = await listener.AcceptSocketAsync();
        var received = ReadAll(new NetworkStream(server));
        var socketWriter = new SocketFrameWriter(new NetworkStream(client), client);
        foreach (var m in messages) await socketWriter.WriteMessageAsync(m, 2 << 20, CancellationToken.None);
        Assert.Equal(expected, await received);

        // A pipe, written as the coordinator writes into Kestrel's.
        var pipe = new System.IO.Pipelines.Pipe();
        received = ReadAll(pipe.Reader.AsStream());
        var pipeWriter = new SocketFrameWriter(pipe.Writer);
        foreach (var m in messages) await pipeWriter.WriteMessageAsync(m, 2 << 20, CancellationToken.None);
        Assert.Equal(expected, await received);

        // A stream (TLS's case).
        using var wire = new MemoryStream();
        var streamWriter = new SocketFrameWriter(wire);
        foreach (var m in messages) await streamWriter.WriteMessageAsync(m, 2 << 20, CancellationToken.None);
        wire.Position = 0;
        Assert.Equal(expected, await ReadAll(wire));

        // A message over the limit is refused before anything is written, chunk or not.
        var before = wire.Length;
        await Assert.ThrowsAsync<RpcException>(async () => await streamWriter.WriteMessageAsync(messages[1], 1 << 20, CancellationToken.None));
        Assert.Equal(before, wire.Length);
    }

    [Fact]
    public async Task ABrokenFrameIsRefusedBeforeItsBodyIsRead()
    {
        // Too large: refused on its header, before any of the announced 64 MiB body is read (the stream holds none).
        var big = new byte[TrainerSocket.FrameHeaderBytes];
        TrainerSocket.WriteHeader(big, SocketFrameKind.Message, 64 << 20);
        var e = await Assert.ThrowsAsync<RpcException>(async () => await new SocketFrameReader(new MemoryStream(big)).ReadAsync(1 << 20, CancellationToken.None));
        Assert.Equal(StatusCode.ResourceExhausted, e.StatusCode);
        Assert.Contains("67108864 bytes", e.Status.Detail, StringComparison.Ordinal);
        // An unknown kind.
        byte[] odd = [0, 0, 0, 0, 9];
        var k = await Assert.ThrowsAsync<ProtocolException>(async () => await new SocketFrameReader(new MemoryStream(odd)).ReadAsync(1 << 20, CancellationToken.None));
        Assert.Contains("frame kind 9", k.Message, StringComparison.Ordinal);
        // Cut inside a header, and inside a body.
        await Assert.ThrowsAsync<EndOfStreamException>(async () => await new SocketFrameReader(new MemoryStream([7, 0, 0])).ReadAsync(1 << 20, CancellationToken.None));
        var cut = new byte[TrainerSocket.FrameHeaderBytes + 3];
        TrainerSocket.WriteHeader(cut, SocketFrameKind.Message, 10);
        await Assert.ThrowsAsync<EndOfStreamException>(async () => await new SocketFrameReader(new MemoryStream(cut)).ReadAsync(1 << 20, CancellationToken.None));
        // A status body that is not one.
        Assert.Throws<ProtocolException>(() => TrainerSocket.DecodeStatus([1, 2]));
    }

    [Fact(Timeout = 60_000)]
    public async Task TheSocketAsksForTheWorkerRoleLikeTheGrpcCall()
    {
        await using var server = await Cluster.Start(Cluster.Options(Path.Combine(Dir, "run"), steps: 5), Roles);
        foreach (var (token, code, text) in new (string?, StatusCode, string)[]
        {
            (null, StatusCode.Unauthenticated, "no token"),
            ("not-a-token", StatusCode.Unauthenticated, "a wrong token"),
            (Cluster.ClientToken, StatusCode.PermissionDenied, "needs the worker role; this token has the client role"),
        })
        {
            var refused = await Assert.ThrowsAsync<RpcException>(() => SocketTrainerCall.ConnectAsync(server.Address, null, Token.Headers(token), TimeSpan.FromSeconds(30), CancellationToken.None));
            Assert.Equal(code, refused.StatusCode);
            Assert.Contains(text, refused.Status.Detail, StringComparison.Ordinal);
        }
        Assert.Empty(server.Loop.Status().Workers);

        // The worker token joins; a gRPC worker joins the same port beside it, and status tells them apart.
        await using var socketWorker = await RawWorker.JoinAsync(server.Address, Cluster.WorkerToken, TrainerTransport.Socket);
        await using var grpcWorker = await RawWorker.JoinAsync(server.Address, Cluster.WorkerToken, TrainerTransport.Grpc);
        await Cluster.WaitUntil(() => server.Loop.Status().Workers.Count == 2, TimeSpan.FromSeconds(10), "both workers to be listed");
        var workers = server.Loop.Status().Workers.ToDictionary(w => w.Id);
        Assert.True(workers[socketWorker.Welcome.WorkerId].Socket);
        Assert.False(workers[grpcWorker.Welcome.WorkerId].Socket);
    }

    [Fact(Timeout = 60_000)]
    public async Task ABrokenFrameOrAMissingHelloEndsTheConnectionWithAStatusAndNoWorker()
    {
        await using var server = await Cluster.Start(Cluster.Options(Path.Combine(Dir, "run"), steps: 5));
        var endpoint = new IPEndPoint(IPAddress.Loopback, server.Address.Port);

        // The preface, then a Message where the Hello belongs.
        var (code, detail) = await RawExchangeAsync(endpoint, [.. TrainerSocket.Preface, .. Frame(SocketFrameKind.Message, [8, 1])]);
        Assert.Equal(StatusCode.InvalidArgument, code);
        Assert.Contains("first frame is Message, expected Hello", detail, StringComparison.Ordinal);

        // Accepted, then a frame of an unknown kind instead of the Join.
        (code, detail) = await RawExchangeAsync(endpoint, [.. TrainerSocket.Preface, .. Frame(SocketFrameKind.Hello, Encoding.UTF8.GetBytes("Bearer " + Cluster.Token)), 0, 0, 0, 0, 42], accepted: true);
        Assert.Equal(StatusCode.InvalidArgument, code);
        Assert.Contains("frame kind 42", detail, StringComparison.Ordinal);

        // Accepted, then a message that is not protobuf.
        (code, detail) = await RawExchangeAsync(endpoint, [.. TrainerSocket.Preface, .. Frame(SocketFrameKind.Hello, Encoding.UTF8.GetBytes("Bearer " + Cluster.Token)), .. Frame(SocketFrameKind.Message, [0xFF, 0xFF, 0xFF])], accepted: true);
        Assert.Equal(StatusCode.InvalidArgument, code);
        Assert.Contains("undecodable WorkerMessage", detail, StringComparison.Ordinal);

        Assert.Empty(server.Loop.Status().Workers);
        Assert.Equal(0, server.Loop.StepsDone);
    }

    [Fact(Timeout = 30_000)]
    public async Task AnAddressThatAnswersWithSomethingElseIsAMismatchNotARetry()
    {
        // An HTTP/2 server (a gRPC-only proxy, say) answers any preface with its SETTINGS frame and GOAWAY.
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        var port = ((IPEndPoint)listener.LocalEndpoint).Port;
        var answer = Task.Run(async () =>
        {
            using var client = await listener.AcceptTcpClientAsync();
            var stream = client.GetStream();
            await stream.WriteAsync(new byte[] { 0, 0, 0x12, 0x04, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0x64, 0, 4, 0, 1, 0, 0, 0, 5, 0, 0x40, 0, 0 });
            await stream.FlushAsync();
            var sink = new byte[1024];
            while (await stream.ReadAsync(sink) > 0) { }
        });
        var e = await Assert.ThrowsAsync<SocketMismatchException>(() =>
            SocketTrainerCall.ConnectAsync(new Uri($"http://127.0.0.1:{port}"), null, Token.Headers("t"), TimeSpan.FromSeconds(10), CancellationToken.None));
        Assert.Contains("no frame of ours", e.Message, StringComparison.Ordinal);
        listener.Stop();
        await answer.WaitAsync(TimeSpan.FromSeconds(10));

        // A server that accepts the connection and never answers (one waiting for more of its own protocol).
        using var silent = new TcpListener(IPAddress.Loopback, 0);
        silent.Start();
        var silentPort = ((IPEndPoint)silent.LocalEndpoint).Port;
        var accepted = silent.AcceptTcpClientAsync();
        var quiet = await Assert.ThrowsAsync<SocketMismatchException>(() =>
            SocketTrainerCall.ConnectAsync(new Uri($"http://127.0.0.1:{silentPort}"), null, Token.Headers("t"), TimeSpan.FromSeconds(1), CancellationToken.None));
        Assert.Contains("did not answer", quiet.Message, StringComparison.Ordinal);
        (await accepted).Dispose();
    }

    [Fact(Timeout = 120_000)]
    public async Task AWorkerBehindAnHttp2OnlyProxyFallsBackToGrpcAndTrains()
    {
        await using var server = await Cluster.Start(Cluster.Options(Path.Combine(Dir, "run"), steps: 3));
        await using var proxy = Http2OnlyProxy.Start(new IPEndPoint(IPAddress.Loopback, server.Address.Port));
        using var worker = new WorkerProcess(new Uri($"http://127.0.0.1:{proxy.Port}"), Cluster.Token, 1);
        await server.Loop.Completion.WaitAsync(TimeSpan.FromSeconds(90));
        Assert.Equal(3, server.Loop.StepsDone);
        await Cluster.WaitUntil(() => worker.Process.HasExited, TimeSpan.FromSeconds(30), "the worker to exit", () => worker.Output);
        Assert.Equal(0, worker.Process.ExitCode);
        Assert.Contains("using the gRPC stream", worker.Output, StringComparison.Ordinal);
        Assert.Equal(1, proxy.Refused);   // one attempt at the socket, then gRPC (one connection: the run never broke)
    }

    /// <summary>
    /// A TCP proxy in front of the coordinator that behaves as an HTTP/2-only one: it waits for the 24 bytes of HTTP/2's
    /// client preface, forwards the connection when they are that, and otherwise answers as an HTTP/2 server does
    /// (its SETTINGS frame and a GOAWAY) and closes.
    /// </summary>
    [System.Diagnostics.CodeAnalysis.SuppressMessage("Usage", "CA2213", Justification = "DisposeAsync disposes the listener (the analyzer looks for Dispose only).")]
    private sealed class Http2OnlyProxy : IAsyncDisposable
    {
        private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
        private readonly IPEndPoint _upstream;
        private readonly CancellationTokenSource _stop = new();
        private readonly List<Task> _tasks = [];
        private int _refused;
        private static readonly byte[] Http2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"u8.ToArray();

        private Http2OnlyProxy(IPEndPoint upstream) => _upstream = upstream;

        public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;
        public int Refused => Volatile.Read(ref _refused);

        public static Http2OnlyProxy Start(IPEndPoint upstream)
        {
            var proxy = new Http2OnlyProxy(upstream);
            proxy._listener.Start();
            proxy._tasks.Add(Task.Run(proxy.AcceptLoopAsync));
            return proxy;
        }

        private async Task AcceptLoopAsync()
        {
            try
            {
                while (true)
                {
                    var client = await _listener.AcceptTcpClientAsync(_stop.Token);
                    lock (_tasks) _tasks.Add(Task.Run(() => ServeAsync(client)));
                }
            }
            catch (Exception e) when (e is OperationCanceledException or SocketException or ObjectDisposedException)
            {
                // stopped
            }
        }

        private async Task ServeAsync(TcpClient client)
        {
            using var _ = client;
            var down = client.GetStream();
            var first = new byte[Http2Preface.Length];
            try
            {
                await down.ReadExactlyAsync(first, _stop.Token);
                if (!first.AsSpan().SequenceEqual(Http2Preface))
                {
                    Interlocked.Increment(ref _refused);
                    // SETTINGS (empty), then GOAWAY (last stream 0, PROTOCOL_ERROR).
                    await down.WriteAsync(new byte[] { 0, 0, 0, 0x04, 0, 0, 0, 0, 0, 0, 0, 8, 0x07, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1 }, _stop.Token);
                    return;
                }
                using var upstream = new TcpClient();
                await upstream.ConnectAsync(_upstream, _stop.Token);
                var up = upstream.GetStream();
                await up.WriteAsync(first, _stop.Token);
                await Task.WhenAny(down.CopyToAsync(up, _stop.Token), up.CopyToAsync(down, _stop.Token));
            }
            catch (Exception e) when (e is IOException or OperationCanceledException or SocketException or ObjectDisposedException)
            {
                // either side went away
            }
        }

        public async ValueTask DisposeAsync()
        {
            await _stop.CancelAsync();
            _listener.Dispose();
            Task[] tasks;
            lock (_tasks) tasks = [.. _tasks];
            await Task.WhenAll(tasks).WaitAsync(TimeSpan.FromSeconds(10));
            _stop.Dispose();
        }
    }

    private static byte[] Frame(SocketFrameKind kind, byte[] body)
    {
        var bytes = new byte[TrainerSocket.FrameHeaderBytes + body.Length];
        TrainerSocket.WriteHeader(bytes, kind, body.Length);
        body.CopyTo(bytes, TrainerSocket.FrameHeaderBytes);
        return bytes;
    }

    /// <summary>Sends raw bytes on a fresh connection; the status the coordinator ends it with (after Accepted, when expected).</summary>
    private static async Task<(StatusCode, string)> RawExchangeAsync(IPEndPoint endpoint, byte[] bytes, bool accepted = false)
    {
        using var client = new TcpClient();
        await client.ConnectAsync(endpoint);
        var stream = client.GetStream();
        await stream.WriteAsync(bytes);
        var reader = new SocketFrameReader(stream);
        using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        var first = await reader.ReadAsync(1 << 20, timeout.Token);
        Assert.NotNull(first);
        if (accepted)
        {
            Assert.Equal(SocketFrameKind.Accepted, first.Kind);
            first.Dispose();
            first = await reader.ReadAsync(1 << 20, timeout.Token);
            Assert.NotNull(first);
        }
        using var frame = first;
        Assert.Equal(SocketFrameKind.Status, frame.Kind);
        var (status, _) = TrainerSocket.DecodeStatus(frame.Body);
        return (status.StatusCode, status.Detail);
    }
}
