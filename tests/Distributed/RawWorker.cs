using DistDiffusion.Coordinator.Training;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Grpc.Core;
using Grpc.Net.Client;

namespace DistDiffusion.Tests.Distributed;

/// <summary>A hand-driven worker stream, to send exactly the (good or hostile) messages a test wants.</summary>
internal sealed class RawWorker : IAsyncDisposable
{
    private readonly GrpcChannel? _channel;
    private readonly AsyncDuplexStreamingCall<WorkerMessage, CoordinatorMessage> _call;
    private readonly SemaphoreSlim _writing = new(1, 1);   // one write at a time (heartbeats run beside the test's writes)
    private CancellationTokenSource? _heartbeats;
    private Task _heartbeating = Task.CompletedTask;

    private RawWorker(GrpcChannel? channel, AsyncDuplexStreamingCall<WorkerMessage, CoordinatorMessage> call)
    {
        _channel = channel;
        _call = call;
    }

    public Welcome Welcome { get; private set; } = new();

    public static RawWorker Open(Uri address, string? token)
    {
        var channel = ClientChannel.Create(address);
        var call = new Trainer.TrainerClient(channel).Connect(Token.Headers(token), deadline: DateTime.UtcNow.AddSeconds(60));
        return new RawWorker(channel, call);
    }

    /// <summary>
    /// A worker stream over <paramref name="transport"/>. On the worker socket the token is checked at the handshake: a
    /// refusal there becomes a call whose reads fail with that status, as a refused gRPC call's do.
    /// </summary>
    public static async Task<RawWorker> OpenAsync(Uri address, string? token, TrainerTransport transport)
    {
        if (transport == TrainerTransport.Grpc) return Open(address, token);
        try
        {
            var call = await SocketTrainerCall.ConnectAsync(address, null, Token.Headers(token), TimeSpan.FromSeconds(30), CancellationToken.None);
            return new RawWorker(null, call.AsCall());
        }
        catch (RpcException e)
        {
            return new RawWorker(null, new AsyncDuplexStreamingCall<WorkerMessage, CoordinatorMessage>(
                new RefusedWriter(e), new RefusedReader(e), Task.FromResult(new Metadata()), () => e.Status, () => e.Trailers, () => { }));
        }
    }

    private sealed class RefusedWriter(RpcException e) : IClientStreamWriter<WorkerMessage>
    {
        public WriteOptions? WriteOptions { get; set; }
        public Task WriteAsync(WorkerMessage message) => Task.FromException(e);
        public Task CompleteAsync() => Task.CompletedTask;
    }

    private sealed class RefusedReader(RpcException e) : IAsyncStreamReader<CoordinatorMessage>
    {
        public CoordinatorMessage Current => throw new InvalidOperationException("refused");
        public Task<bool> MoveNext(CancellationToken cancellationToken) => Task.FromException<bool>(e);
    }

    public static async Task<RawWorker> JoinAsync(Uri address, string? token = Cluster.Token, TrainerTransport transport = TrainerTransport.Grpc)
    {
        var w = await OpenAsync(address, token, transport);
        await w.SendAsync(new WorkerMessage { Join = new Join { Host = "raw", Device = "cpu", Threads = 1, ProtocolVersion = Names.ProtocolVersion } });
        var first = await w.ReadAsync();
        Assert.Equal(CoordinatorMessage.KindOneofCase.Welcome, first.KindCase);
        w.Welcome = first.Welcome;
        return w;
    }

    /// <summary>The shared-memory segment this worker mapped (<see cref="JoinSharedAsync"/>), else null.</summary>
    public SharedTensorSegment? Segment { get; private set; }

    /// <summary>Joins asking for shared memory, as a worker under the coordinator's kernel does, and maps the offered segment.</summary>
    public static async Task<RawWorker> JoinSharedAsync(Uri address, TrainerTransport transport = TrainerTransport.Socket)
    {
        var w = await OpenAsync(address, Cluster.Token, transport);
        await w.SendAsync(new WorkerMessage
        {
            Join = new Join { Host = "raw", Device = "cpu", Threads = 1, ProtocolVersion = Names.ProtocolVersion, SharedMemory = true, BootId = SharedTensorSegment.BootId },
        });
        var first = await w.ReadAsync();
        Assert.Equal(CoordinatorMessage.KindOneofCase.Welcome, first.KindCase);
        w.Welcome = first.Welcome;
        var offer = first.Welcome.SharedMemory ?? throw new InvalidOperationException("the coordinator offered no shared memory");
        w.Segment = SharedTensorSegment.TryOpen(offer.Path, offer.Nonce, (long)offer.RegionBytes, out var reason) ?? throw new InvalidOperationException(reason);
        await w.SendAsync(new WorkerMessage { SharedMemoryReply = new SharedMemoryReply { Accepted = true } });
        return w;
    }

    /// <summary>
    /// A gradient push for <paramref name="a"/> through the shared region: <paramref name="values"/> written as one write
    /// of the region, and its header; <paramref name="tamper"/> may change the header, or the region after the write.
    /// </summary>
    public WorkerMessage PushShared(StepAssignment a, float[] values, Action<GradientHeader, SharedTensorSegment>? tamper = null)
    {
        var segment = Segment ?? throw new InvalidOperationException("this worker has no shared-memory segment");
        var bytes = System.Runtime.InteropServices.MemoryMarshal.AsBytes(values.AsSpan());
        var sequence = segment.Write(SharedRegion.Gradients, bytes);
        var header = new GradientHeader
        {
            WorkerId = Welcome.WorkerId,
            Step = a.Step,
            ParameterVersion = a.ParameterVersion,
            Slice = a.Slice,
            Tensor = TensorTransport.SharedHeader(bytes.Length, DType.Float32, values.Length, a.Step, a.ParameterVersion, sequence),
            Present = Google.Protobuf.ByteString.CopyFrom(Enumerable.Repeat((byte)0xFF, (Welcome.Parameters.Count + 7) / 8).ToArray()),
            Loss = 0.5,
            SampleCount = (uint)a.Indices.Count,
        };
        tamper?.Invoke(header, segment);
        return new WorkerMessage { Gradient = header };
    }

    public async Task SendAsync(WorkerMessage m)
    {
        await _writing.WaitAsync(TimeSpan.FromSeconds(30));
        try
        {
            await _call.RequestStream.WriteAsync(m).WaitAsync(TimeSpan.FromSeconds(30));
        }
        finally
        {
            _writing.Release();
        }
    }

    /// <summary>Sends a heartbeat every 250 ms until <see cref="StopHeartbeatsAsync"/> (a real worker sends one per interval).</summary>
    public void StartHeartbeats()
    {
        _heartbeats = new CancellationTokenSource();
        var ct = _heartbeats.Token;
        _heartbeating = Task.Run(async () =>
        {
            using var timer = new PeriodicTimer(TimeSpan.FromMilliseconds(250));
            try
            {
                while (await timer.WaitForNextTickAsync(ct))
                    await SendAsync(new WorkerMessage { Heartbeat = new Heartbeat { WorkerId = Welcome.WorkerId } });
            }
            catch (Exception e) when (e is OperationCanceledException or RpcException or InvalidOperationException or TimeoutException)
            {
                // stopped, or the stream is gone
            }
        });
    }

    /// <summary>Stops the heartbeats: from now on this worker is silent.</summary>
    public async Task StopHeartbeatsAsync()
    {
        if (_heartbeats is null) return;
        await _heartbeats.CancelAsync();
        await _heartbeating;
        _heartbeats.Dispose();
        _heartbeats = null;
    }

    /// <summary>Reads past everything else (parameters, sampling weights) to the next sampling batch.</summary>
    public async Task<SampleWork> NextSampleWorkAsync()
    {
        while (true)
        {
            var m = await ReadAsync();
            if (m.KindCase == CoordinatorMessage.KindOneofCase.SampleWork) return m.SampleWork;
        }
    }

    public async Task<CoordinatorMessage> ReadAsync()
    {
        Assert.True(await _call.ResponseStream.MoveNext(CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(30)), "the coordinator closed the stream");
        return _call.ResponseStream.Current;
    }

    /// <summary>Reads past parameters and acks to the next assignment.</summary>
    public async Task<StepAssignment> NextAssignmentAsync()
    {
        while (true)
        {
            var m = await ReadAsync();
            if (m.KindCase == CoordinatorMessage.KindOneofCase.Assignment) return m.Assignment;
        }
    }

    public async Task<Ack> NextAckAsync()
    {
        while (true)
        {
            var m = await ReadAsync();
            if (m.KindCase == CoordinatorMessage.KindOneofCase.Ack) return m.Ack;
        }
    }

    /// <summary>The coordinator's first message, or the status it ended the call with instead.</summary>
    public async Task<object> FirstOrFailureAsync()
    {
        try
        {
            return await _call.ResponseStream.MoveNext(CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(30)) ? _call.ResponseStream.Current : "the stream ended without a status";
        }
        catch (RpcException e)
        {
            return e;
        }
    }

    /// <summary>Reads until the call fails; the status the coordinator ended it with.</summary>
    public async Task<RpcException> FailureAsync()
    {
        try
        {
            while (await _call.ResponseStream.MoveNext(CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(30))) { }
        }
        catch (RpcException e)
        {
            return e;
        }
        Assert.Fail("the stream ended without an error status");
        return null!;
    }

    public long Elements => Welcome.Parameters.Sum(p => p.Shape.Aggregate(1L, (a, b) => a * b));

    /// <summary>The messages of a gradient push for <paramref name="a"/> with <paramref name="values"/>; <paramref name="tamper"/> may corrupt the header.</summary>
    public List<WorkerMessage> Push(StepAssignment a, float[] values, Action<GradientHeader>? tamper = null)
    {
        var bytes = System.Runtime.InteropServices.MemoryMarshal.AsBytes(values.AsSpan()).ToArray();
        var header = new GradientHeader
        {
            WorkerId = Welcome.WorkerId,
            Step = a.Step,
            ParameterVersion = a.ParameterVersion,
            Slice = a.Slice,
            Tensor = TensorTransport.Header(bytes, DType.Float32, values.Length, a.Step, a.ParameterVersion),
            Present = Google.Protobuf.ByteString.CopyFrom(Enumerable.Repeat((byte)0xFF, (Welcome.Parameters.Count + 7) / 8).ToArray()),
            Loss = 0.5,
            SampleCount = (uint)a.Indices.Count,
        };
        tamper?.Invoke(header);
        var messages = new List<WorkerMessage> { new() { Gradient = header } };
        messages.AddRange(TensorTransport.Chunks(bytes, a.Step, a.ParameterVersion)
            .Select(c => new WorkerMessage { GradientChunk = new GradientChunk { WorkerId = Welcome.WorkerId, Slice = a.Slice, Chunk = c } }));
        return messages;
    }

    public async Task SendAllAsync(IEnumerable<WorkerMessage> messages)
    {
        foreach (var m in messages) await SendAsync(m);
    }

    public async ValueTask DisposeAsync()
    {
        await StopHeartbeatsAsync();
        try { await _call.RequestStream.CompleteAsync(); } catch (Exception e) when (e is RpcException or InvalidOperationException) { /* already failed */ }
        _call.Dispose();
        _channel?.Dispose();
        _writing.Dispose();
        Segment?.Dispose();
    }
}
