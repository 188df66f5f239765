using System.Net;
using DistDiffusion.Coordinator.Access;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Grpc.Core;
using Grpc.Health.V1;
using Grpc.Reflection.V1Alpha;

namespace DistDiffusion.Tests.Distributed;

/// <summary>
/// Who may call what: worker and client tokens each open their own RPCs only, the shared token opens all; the health
/// Check is the one call without a token, and no caller without one holds a stream.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class AccessTests() : TempFolderTest("dd-access")
{
    private static readonly ServerCredentials Roles = new(null, Cluster.WorkerToken, Cluster.ClientToken);

    [Fact(Timeout = 60_000)]
    public async Task AClientTokenCannotJoinAndAWorkerTokenCannotReadStatusOrAskForSamples()
    {
        await using var server = await Cluster.Start(Cluster.Options(Path.Combine(Dir, "run"), steps: 5), Roles);
        using var channel = ClientChannel.Create(server.Address);

        await using (var intruder = RawWorker.Open(server.Address, Cluster.ClientToken))
        {
            try
            {
                await intruder.SendAsync(new WorkerMessage { Join = new Join { Host = "raw", Device = "cpu", ProtocolVersion = Names.ProtocolVersion } });
            }
            catch (RpcException)
            {
                // refused before the write completed
            }
            var denied = await intruder.FailureAsync();
            Assert.Equal(StatusCode.PermissionDenied, denied.StatusCode);
            Assert.Contains("/distdiffusion.v1.Trainer/Connect needs the worker role; this token has the client role", denied.Status.Detail, StringComparison.Ordinal);
        }
        Assert.Empty(server.Loop.Status().Workers);

        var status = new Coordination.CoordinationClient(channel);
        var e = await Assert.ThrowsAsync<RpcException>(async () => await status.GetStatusAsync(new GetStatusRequest(), Token.Headers(Cluster.WorkerToken)));
        Assert.Equal(StatusCode.PermissionDenied, e.StatusCode);
        Assert.Contains("needs the client role; this token has the worker role", e.Status.Detail, StringComparison.Ordinal);
        using (var sample = new Sampler.SamplerClient(channel).Sample(new SampleRequest { Count = 1 }, Token.Headers(Cluster.WorkerToken)))
        {
            var se = await Assert.ThrowsAsync<RpcException>(() => sample.ResponseStream.MoveNext(CancellationToken.None));
            Assert.Equal(StatusCode.PermissionDenied, se.StatusCode);
        }
        var reflection = new ServerReflection.ServerReflectionClient(channel).ServerReflectionInfo(Token.Headers(Cluster.WorkerToken));
        try
        {
            await reflection.RequestStream.WriteAsync(new ServerReflectionRequest { ListServices = "" });
        }
        catch (RpcException)
        {
            // refused before the write completed
        }
        Assert.Equal(StatusCode.PermissionDenied, (await Assert.ThrowsAsync<RpcException>(() => reflection.ResponseStream.MoveNext(CancellationToken.None))).StatusCode);

        // Each token does what its role is for.
        await using var worker = await RawWorker.JoinAsync(server.Address, Cluster.WorkerToken);
        var reply = await status.GetStatusAsync(new GetStatusRequest(), Token.Headers(Cluster.ClientToken));
        Assert.Equal(worker.Welcome.WorkerId, Assert.Single(reply.Workers).Id);
    }

    [Fact(Timeout = 90_000)]
    public async Task AWorkerProcessGivenTheClientTokenExitsNamingTheWorkerRoleAndOneGivenTheWorkerTokenTrains()
    {
        await using var server = await Cluster.Start(Cluster.Options(Path.Combine(Dir, "run"), steps: 3), Roles);
        using (var wrong = new WorkerProcess(server.Address, Cluster.ClientToken))
        {
            await Cluster.WaitUntil(() => wrong.Process.HasExited, TimeSpan.FromSeconds(60), "the worker with the client token to exit", () => wrong.Output);
            wrong.Process.WaitForExit();   // the rest of its output
            Assert.Equal(1, wrong.Process.ExitCode);
            Assert.Contains("PermissionDenied", wrong.Output, StringComparison.Ordinal);
            Assert.Contains("needs the worker role", wrong.Output, StringComparison.Ordinal);
        }
        // The worker token from the variable workers read first, with a wrong shared token beside it.
        using var good = new WorkerProcess(server.Address, "not-the-token", 1, environment: new Dictionary<string, string>
        {
            [Names.WorkerTokenEnvironmentVariable] = Cluster.WorkerToken,
        });
        await Cluster.WaitUntil(() => server.Loop.Completion.IsCompleted, TimeSpan.FromSeconds(70), "training with the worker token", () => good.Output);
        Assert.Equal(3, server.Loop.StepsDone);
    }

    [Fact(Timeout = 60_000)]
    public async Task HealthCheckNeedsNoTokenButHealthWatchDoes()
    {
        await using var server = await Cluster.Start(Cluster.Options(Path.Combine(Dir, "run"), steps: 5), Roles);
        using var channel = ClientChannel.Create(server.Address);
        var health = new Health.HealthClient(channel);
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, (await health.CheckAsync(new HealthCheckRequest())).Status);

        foreach (var token in new string?[] { null, "wrong-token" })
        {
            using var watch = health.Watch(new HealthCheckRequest(), Token.Headers(token));
            var e = await Assert.ThrowsAsync<RpcException>(() => watch.ResponseStream.MoveNext(CancellationToken.None));
            Assert.Equal(StatusCode.Unauthenticated, e.StatusCode);
        }
        foreach (var token in new[] { Cluster.WorkerToken, Cluster.ClientToken })
        {
            using var cts = new CancellationTokenSource();
            using var watch = health.Watch(new HealthCheckRequest { Service = "distdiffusion.v1.Trainer" }, Token.Headers(token), cancellationToken: cts.Token);
            Assert.True(await watch.ResponseStream.MoveNext(CancellationToken.None));
            Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, watch.ResponseStream.Current.Status);
            await cts.CancelAsync();
        }
    }

    [Fact(Timeout = 90_000)]
    public async Task ACallWithoutATokenCannotHoldAStream()
    {
        await using var server = await Cluster.Start(Cluster.Options(Path.Combine(Dir, "run"), steps: 5), Roles);
        using var handler = new SocketsHttpHandler();
        using var http = new HttpClient(handler) { Timeout = Timeout.InfiniteTimeSpan };
        using var stop = new CancellationTokenSource();
        try
        {
            // A status call whose request never arrives: refused on its headers, without waiting for the request.
#pragma warning disable CA2000 // both requests stay in flight until the finally cancels them; disposing one mid-send would change what is tested
            var refused = await http.SendAsync(StalledCall(server.Address, "/distdiffusion.v1.Coordination/GetStatus", stop.Token), HttpCompletionOption.ResponseHeadersRead);
            Assert.Equal(((int)StatusCode.Unauthenticated).ToString(System.Globalization.CultureInfo.InvariantCulture), refused.Headers.GetValues("grpc-status").Single());

            // The one open call, a health Check, whose request trickles in (1 KiB every 100 ms towards 1 MiB: fast enough
            // for Kestrel's minimum data rate, so it would take 100 s): the coordinator ends it at its limit.
            var trickle = new TricklingContent(1 << 20, stop.Token);
            var check = http.SendAsync(Call(server.Address, Names.HealthCheckMethod, trickle), HttpCompletionOption.ResponseHeadersRead);
#pragma warning restore CA2000
            await Cluster.WaitUntil(() => check.IsCompleted, AccessMiddleware.OpenCallLimit * 4, "the coordinator to end a trickling health check");
            Assert.True(check.IsFaulted, "the trickling health check was answered");
            Assert.True(trickle.Sent < trickle.Total, $"the whole request arrived ({trickle.Sent} bytes)");
        }
        finally
        {
            await stop.CancelAsync();
        }
    }

    [Fact(Timeout = 120_000)]
    public async Task RunsTokenFileReadsStatusButCannotJoin()
    {
        var runDir = Path.Combine(Dir, "run");
        using var run = new CoordinatorProcess(["run", "--workers", "1", "--recipe", "swissroll", "--steps", "100000", "--out", runDir, "--worker-threads", "1",
            .. Cluster.Sets().SelectMany(s => new[] { "--set", s })]);
        var tokenFile = Path.Combine(runDir, "token");
        await Cluster.WaitUntil(() => run.Output.Contains("coordinator http", StringComparison.Ordinal) && File.Exists(tokenFile), TimeSpan.FromSeconds(60), "run to start", () => run.Output);
        var address = new Uri(System.Text.RegularExpressions.Regex.Match(run.Output, @"coordinator (http://[0-9.:]+/?)").Groups[1].Value);
        var token = Token.Resolve(tokenFile)!;
        await Cluster.WaitUntil(() => Cluster.Step(address, token) >= 2, TimeSpan.FromSeconds(60), "step 2 (status with the run's token file)", () => run.Output);
        await using var intruder = RawWorker.Open(address, token);
        try
        {
            await intruder.SendAsync(new WorkerMessage { Join = new Join { Host = "raw", Device = "cpu", ProtocolVersion = Names.ProtocolVersion } });
        }
        catch (RpcException)
        {
            // refused before the write completed
        }
        Assert.Equal(StatusCode.PermissionDenied, (await intruder.FailureAsync()).StatusCode);
    }

    /// <summary>A gRPC POST with the headers of a real call and a request body that never arrives.</summary>
    private static HttpRequestMessage StalledCall(Uri address, string method, CancellationToken stop) => Call(address, method, new NeverEndingContent(stop));

    private static HttpRequestMessage Call(Uri address, string method, HttpContent content) => new(HttpMethod.Post, new Uri(address, method))
    {
        Version = HttpVersion.Version20,
        VersionPolicy = HttpVersionPolicy.RequestVersionExact,
        Headers = { TE = { new System.Net.Http.Headers.TransferCodingWithQualityHeaderValue("trailers") } },
        Content = content,
    };

    /// <summary>One gRPC message of <paramref name="total"/> bytes, sent 1 KiB every 100 ms.</summary>
    private sealed class TricklingContent : HttpContent
    {
        private readonly CancellationToken _stop;
        private long _sent;

        public TricklingContent(int total, CancellationToken stop)
        {
            Total = total;
            _stop = stop;
            Headers.ContentType = new System.Net.Http.Headers.MediaTypeHeaderValue("application/grpc");
        }

        public int Total { get; }
        public long Sent => Interlocked.Read(ref _sent);

        protected override async Task SerializeToStreamAsync(Stream stream, TransportContext? context)
        {
            var header = new byte[5];
            System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(header.AsSpan(1), (uint)Total);
            await stream.WriteAsync(header, _stop);
            var chunk = new byte[1024];
            while (Sent < Total)
            {
                await stream.WriteAsync(chunk, _stop);
                await stream.FlushAsync(_stop);
                Interlocked.Add(ref _sent, chunk.Length);
                await Task.Delay(100, _stop);
            }
        }

        protected override bool TryComputeLength(out long length)
        {
            length = 0;
            return false;
        }
    }

    private sealed class NeverEndingContent : HttpContent
    {
        private readonly CancellationToken _stop;

        public NeverEndingContent(CancellationToken stop)
        {
            _stop = stop;
            Headers.ContentType = new System.Net.Http.Headers.MediaTypeHeaderValue("application/grpc");
        }

        protected override async Task SerializeToStreamAsync(Stream stream, TransportContext? context)
        {
            await stream.WriteAsync(new byte[] { 0, 0, 0, 0, 100 });   // a frame header announcing 100 bytes that never come
            await stream.FlushAsync();
            await Task.Delay(Timeout.Infinite, _stop).ContinueWith(_ => { }, TaskScheduler.Default);
        }

        protected override bool TryComputeLength(out long length)
        {
            length = 0;
            return false;
        }
    }
}
