using DistDiffusion.Model.Configuration;
using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;
using Google.Protobuf;
using Grpc.Core;
using Grpc.Health.V1;
using Grpc.Reflection.V1Alpha;

namespace DistDiffusion.Tests.Distributed;

/// <summary>
/// Every kind of bad message gets its own status code and leaves parameters, optimizer state and step untouched;
/// duplicate and stale pushes are acknowledged and ignored; every RPC but health needs the token.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class HostileInputTests() : TempFolderTest("dd-hostile")
{

    private static readonly (string Kind, StatusCode Expected)[] Kinds =
    [
        ("wrong tensor length", StatusCode.InvalidArgument),
        ("NaN gradient", StatusCode.InvalidArgument),
        ("Inf gradient", StatusCode.InvalidArgument),
        ("unknown worker id", StatusCode.InvalidArgument),
        ("future step", StatusCode.FailedPrecondition),
        ("wrong parameter version", StatusCode.FailedPrecondition),
        ("oversized message", StatusCode.ResourceExhausted),
        ("chunk without header", StatusCode.FailedPrecondition),
        ("checksum mismatch", StatusCode.InvalidArgument),
        ("wrong sample count", StatusCode.InvalidArgument),
        ("second join", StatusCode.FailedPrecondition),
        ("unknown dtype", StatusCode.InvalidArgument),
    ];

    /// <summary>Every kind on both ways a worker's stream travels: the gRPC call and the worker socket.</summary>
    public static TheoryData<string, StatusCode, TrainerTransport> Cases
    {
        get
        {
            var data = new TheoryData<string, StatusCode, TrainerTransport>();
            foreach (var transport in (TrainerTransport[])[TrainerTransport.Grpc, TrainerTransport.Socket])
                foreach (var (kind, expected) in Kinds) data.Add(kind, expected, transport);
            return data;
        }
    }

    [Theory(Timeout = 60_000)]
    [MemberData(nameof(Cases))]
    public async Task ABadPushGetsItsStatusAndChangesNothing(string kind, StatusCode expected, TrainerTransport transport)
    {
        await using var server = await Cluster.Start(Cluster.Options(Path.Combine(Dir, "run"), steps: 5));
        await using var w = await RawWorker.JoinAsync(server.Address, transport: transport);
        var a = await w.NextAssignmentAsync();
        var before = (server.Loop.StepsDone, server.Loop.ParameterChecksum);
        var good = new float[w.Elements];
        List<WorkerMessage> messages = kind switch
        {
            "wrong tensor length" => w.Push(a, new float[w.Elements - 1]),
            "NaN gradient" => w.Push(a, good.Select((_, i) => i == 7 ? float.NaN : 0f).ToArray()),
            "Inf gradient" => w.Push(a, good.Select((_, i) => i == 3 ? float.PositiveInfinity : 0f).ToArray()),
            "unknown worker id" => w.Push(a, good, h => h.WorkerId = "w999-intruder"),
            "future step" => w.Push(a, good, h => { h.Step += 5; h.Tensor.Step += 5; }),
            "wrong parameter version" => w.Push(a, good, h => { h.ParameterVersion += 1; h.Tensor.ParameterVersion += 1; }),
            "oversized message" => [new WorkerMessage { GradientChunk = new GradientChunk { WorkerId = w.Welcome.WorkerId, Chunk = new TensorChunk { Data = ByteString.CopyFrom(new byte[3 << 20]) } } }],
            "chunk without header" => w.Push(a, good).Skip(1).ToList(),
            "checksum mismatch" => w.Push(a, good, h => h.Tensor.Checksum ^= 1),
            "wrong sample count" => w.Push(a, good, h => h.SampleCount += 1),
            "second join" => [new WorkerMessage { Join = new Join { ProtocolVersion = Names.ProtocolVersion } }],
            "unknown dtype" => w.Push(a, good, h => h.Tensor.Dtype = (DType)7),
            _ => throw new ArgumentException(kind),
        };
        try
        {
            await w.SendAllAsync(messages);
        }
        catch (RpcException)
        {
            // the server may end the call while we are still writing; the status is read below
        }
        var error = await w.FailureAsync();
        Assert.Equal(expected, error.StatusCode);
        Assert.False(string.IsNullOrWhiteSpace(error.Status.Detail));
        // The loop sees the worker go and waits for another (polling: the two state changes are not atomic).
        await Cluster.WaitUntil(() =>
        {
            var status = server.Loop.Status();
            return status.Workers.All(x => x.State == WorkerState.Dropped) && status.State == RunState.WaitingForWorkers;
        }, TimeSpan.FromSeconds(10), "the worker to be dropped and training to wait");
        Assert.Equal(before, (server.Loop.StepsDone, server.Loop.ParameterChecksum));
    }

    /// <summary>
    /// A gradient in shared memory is taken only as the write its header names: not an earlier write, not one in
    /// progress, not a sequence no finished write has. A good one is taken.
    /// </summary>
    [SharedMemoryTheory(Timeout = 60_000)]
    [InlineData("good")]
    [InlineData("earlier write")]
    [InlineData("write in progress")]
    [InlineData("no sequence")]
    public async Task ASharedMemoryGradientIsTakenOnlyAsTheWriteItsHeaderNames(string kind)
    {
        await using var server = await Cluster.Start(Cluster.Options(Path.Combine(Dir, "run"), steps: 5));
        await using var w = await RawWorker.JoinSharedAsync(server.Address);
        var a = await w.NextAssignmentAsync();
        var before = (server.Loop.StepsDone, server.Loop.ParameterChecksum);
        var push = w.PushShared(a, new float[w.Elements], kind switch
        {
            "good" => null,
            "earlier write" => (_, segment) => segment.Write(SharedRegion.Gradients, new byte[16]),
            "write in progress" => (_, segment) => segment.BeginWrite(SharedRegion.Gradients),
            "no sequence" => (h, _) => h.Tensor.SharedSequence = 0,
            _ => throw new ArgumentException(kind),
        });
        await w.SendAsync(push);
        if (kind == "good")
        {
            Assert.True((await w.NextAckAsync()).Applied);
            await Cluster.WaitUntil(() => server.Loop.StepsDone == 1, TimeSpan.FromSeconds(10), "step 1");
            return;
        }
        var error = await w.FailureAsync();
        Assert.Equal(StatusCode.InvalidArgument, error.StatusCode);
        Assert.Contains(kind switch
        {
            "earlier write" => "the shared region holds write 4, the header describes write 2",
            "write in progress" => "the shared region is being written (sequence 3), the header describes write 2",
            _ => "shared_sequence 0, expected the even, nonzero sequence of a finished write",
        }, error.Status.Detail, StringComparison.Ordinal);
        await Cluster.WaitUntil(() => server.Loop.Status().Workers.All(x => x.State == WorkerState.Dropped), TimeSpan.FromSeconds(10), "the worker to be dropped");
        Assert.Equal(before, (server.Loop.StepsDone, server.Loop.ParameterChecksum));
    }

    [Fact(Timeout = 60_000)]
    public async Task DuplicateAndStalePushesAreAcknowledgedAndIgnored()
    {
        await using var server = await Cluster.Start(Cluster.Options(Path.Combine(Dir, "run"), steps: 5));
        await using var w = await RawWorker.JoinAsync(server.Address);
        var a = await w.NextAssignmentAsync();
        var push = w.Push(a, new float[w.Elements]);
        await w.SendAllAsync(push);
        var ack = await w.NextAckAsync();
        Assert.True(ack.Applied);
        var next = await w.NextAssignmentAsync();
        Assert.Equal(1UL, next.Step);
        var after = (server.Loop.StepsDone, server.Loop.ParameterChecksum);

        await w.SendAllAsync(push);   // the same push again: step 0 is done
        var again = await w.NextAckAsync();
        Assert.False(again.Applied);
        Assert.Equal(0UL, again.Step);
        Assert.Equal(after, (server.Loop.StepsDone, server.Loop.ParameterChecksum));

        // The stream is still good: the step-1 push is applied.
        await w.SendAllAsync(w.Push(next, new float[w.Elements]));
        Assert.True((await w.NextAckAsync()).Applied);
        await Cluster.WaitUntil(() => server.Loop.StepsDone == 2, TimeSpan.FromSeconds(10), "step 2");
    }

    [Fact(Timeout = 60_000)]
    public async Task EveryRpcButHealthNeedsTheToken()
    {
        await using var server = await Cluster.Start(Cluster.Options(Path.Combine(Dir, "run"), steps: 5));
        using var channel = ClientChannel.Create(server.Address);
        var status = new Coordination.CoordinationClient(channel);
        foreach (var token in new string?[] { null, "wrong-token" })
        {
            var e = await Assert.ThrowsAsync<RpcException>(async () => await status.GetStatusAsync(new GetStatusRequest(), Token.Headers(token)));
            Assert.Equal(StatusCode.Unauthenticated, e.StatusCode);
            await using var w = RawWorker.Open(server.Address, token);
            try
            {
                await w.SendAsync(new WorkerMessage { Join = new Join { ProtocolVersion = Names.ProtocolVersion } });
            }
            catch (RpcException)
            {
                // refused before the write completed
            }
            Assert.Equal(StatusCode.Unauthenticated, (await w.FailureAsync()).StatusCode);
            var reflection = new ServerReflection.ServerReflectionClient(channel).ServerReflectionInfo(Token.Headers(token));
            try
            {
                await reflection.RequestStream.WriteAsync(new ServerReflectionRequest { ListServices = "" });
            }
            catch (RpcException)
            {
                // refused before the write completed
            }
            var re = await Assert.ThrowsAsync<RpcException>(async () => await reflection.ResponseStream.MoveNext(CancellationToken.None));
            Assert.Equal(StatusCode.Unauthenticated, re.StatusCode);
        }
        Assert.Empty(server.Loop.Status().Workers);

        // Health answers without a token (Kubernetes probes carry none).
        var health = await new Health.HealthClient(channel).CheckAsync(new HealthCheckRequest { Service = "distdiffusion.v1.Trainer" });
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, health.Status);

        // With the token: status and reflection work.
        var reply = await status.GetStatusAsync(new GetStatusRequest(), Token.Headers(Cluster.Token));
        Assert.Equal("swissroll", reply.Recipe);
        var ok = new ServerReflection.ServerReflectionClient(channel).ServerReflectionInfo(Token.Headers(Cluster.Token));
        await ok.RequestStream.WriteAsync(new ServerReflectionRequest { ListServices = "" });
        Assert.True(await ok.ResponseStream.MoveNext(CancellationToken.None));
        Assert.Contains(ok.ResponseStream.Current.ListServicesResponse.Service, s => s.Name == "distdiffusion.v1.Trainer");
        await ok.RequestStream.CompleteAsync();
    }

    [Fact(Timeout = 60_000)]
    public async Task ServeRefusesToStartWithoutATokenUnlessAllowed()
    {
        var e = await Assert.ThrowsAsync<ArgumentException>(() => Cluster.Start(Cluster.Options(Path.Combine(Dir, "a"), steps: 5), token: null));
        Assert.Contains("--allow-unauthenticated", e.Message, StringComparison.Ordinal);
        var open = Cluster.Options(Path.Combine(Dir, "b"), steps: 5);
        open.AllowUnauthenticated = true;
        await using var server = await Cluster.Start(open, token: null);
        using var channel = ClientChannel.Create(server.Address);
        var reply = await new Coordination.CoordinationClient(channel).GetStatusAsync(new GetStatusRequest());
        Assert.Equal(RunState.WaitingForWorkers, reply.State);
    }
}
