using DistDiffusion.Coordinator.Monitoring;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Google.Rpc;
using Grpc.Core;
using Grpc.Health.V1;

namespace DistDiffusion.Tests.Distributed;

/// <summary>
/// Strings a worker sends (Join's host, device and boot id; leave and error texts) are bounded and cannot forge log
/// lines, and no number of workers pushes GetStatus over the message limit.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class PeerStringTests() : TempFolderTest("dd-strings")
{
    private static Join GoodJoin() => new() { Host = "raw", Device = "cpu", Threads = 1, ProtocolVersion = Names.ProtocolVersion };

    public static TheoryData<string, string> BadJoins => new()
    {
        { "long host", "join.host is 300 characters long; the limit is 253" },
        { "newline in host", "join.host holds the control character U+000A at index 4" },
        { "long device", "join.device is 65 characters long; the limit is 64" },
        { "right-to-left override in device", "join.device holds the control character U+202E at index 3" },
        { "long boot id", "join.boot_id is 65 characters long; the limit is 64" },
        { "negative threads", "join.threads -1: expected 0..65536" },
    };

    [Theory(Timeout = 60_000)]
    [MemberData(nameof(BadJoins))]
    public async Task AJoinWithAnOverlongOrControlCharacterStringIsRefusedNamingTheFieldItsLengthAndTheLimit(string kind, string expected)
    {
        await using var server = await Cluster.Start(Cluster.Options(Path.Combine(Dir, "run"), steps: 5));
        var join = GoodJoin();
        switch (kind)
        {
            case "long host": join.Host = new string('h', 300); break;
            case "newline in host": join.Host = "evil\n12:00:00.000 INF forged"; break;
            case "long device": join.Device = new string('d', 65); break;
            case "right-to-left override in device": join.Device = "cpu\u202Eevil"; break;
            case "long boot id": join.BootId = new string('b', 65); break;
            case "negative threads": join.Threads = -1; break;
            default: throw new ArgumentException(kind);
        }
        await using var w = RawWorker.Open(server.Address, Cluster.Token);
        await w.SendAsync(new WorkerMessage { Join = join });
        var error = await w.FailureAsync();
        Assert.Equal(StatusCode.InvalidArgument, error.StatusCode);
        Assert.Contains(expected, error.Status.Detail, StringComparison.Ordinal);
        var violation = Assert.Single(error.GetRpcStatus()!.GetDetail<BadRequest>().FieldViolations);
        Assert.StartsWith(violation.Field + " ", expected, StringComparison.Ordinal);
        Assert.Empty(server.Loop.Status().Workers);
    }

    [Fact(Timeout = 60_000)]
    public async Task WorkersWithHugeNamesCannotPushStatusOverItsMessageLimit()
    {
        await using var server = await Cluster.Start(Cluster.Options(Path.Combine(Dir, "run"), steps: 5));
        // Five joins with a 1,000,000-character host each (under the 1 MiB message limit): 5 MB of names in a reply
        // would exceed the 4 MiB clients accept.
        var workers = new List<RawWorker>();
        try
        {
            for (var i = 0; i < 5; i++)
            {
                var w = RawWorker.Open(server.Address, Cluster.Token);
                workers.Add(w);
                var join = GoodJoin();
                join.Host = new string((char)('a' + i), 1_000_000);
                await w.SendAsync(new WorkerMessage { Join = join });
                var first = await w.FirstOrFailureAsync();
                Assert.True(first is RpcException { StatusCode: StatusCode.InvalidArgument }, $"join {i} was answered with {first}");
            }
            using var channel = ClientChannel.Create(server.Address);
            var reply = await new Coordination.CoordinationClient(channel).GetStatusAsync(new GetStatusRequest(), Token.Headers(Cluster.Token));
            Assert.Empty(reply.Workers);
        }
        finally
        {
            foreach (var w in workers) await w.DisposeAsync();
        }
    }

    [Fact]
    public void AStatusWithManyWorkersIsCutToTheLimitListingConnectedWorkersFirst()
    {
        var reply = new StatusReply { Recipe = "swissroll", RunId = "run" };
        // 20,000 workers with the longest names a Join may carry: ~7 MB, well over the 4 MiB clients accept.
        for (var i = 0; i < 20_000; i++)
            reply.Workers.Add(new WorkerStatus
            {
                Id = $"w{i}-abcdef",
                Host = new string('h', WireText.MaxHost),
                Device = new string('d', WireText.MaxDevice),
                State = i % 2 == 0 ? WorkerState.Dropped : WorkerState.Busy,
                LastSeenSecondsAgo = i,
                StepsDone = (ulong)i,
            });
        Assert.True(reply.CalculateSize() > ClientChannel.MaxReceiveMessageBytes);
        var fitted = StatusService.Fit(reply.Clone(), StatusService.MaxReplyBytes);
        Assert.True(fitted.CalculateSize() <= StatusService.MaxReplyBytes, $"{fitted.CalculateSize()} bytes");
        Assert.Equal(20_000, fitted.Workers.Count + (int)fitted.WorkersOmitted);
        Assert.InRange(fitted.Workers.Count, 10_000, 19_999);
        // All 10,000 connected workers are listed; the departed ones that fit are the most recently seen, in the original order.
        Assert.Equal(10_000, fitted.Workers.Count(w => w.State == WorkerState.Busy));
        var departed = fitted.Workers.Where(w => w.State == WorkerState.Dropped).Select(w => w.LastSeenSecondsAgo).ToList();
        Assert.Equal(Enumerable.Range(0, departed.Count).Select(k => 2.0 * k), departed);
        // A reply that fits is left as it is.
        var small = new StatusReply { Workers = { reply.Workers.Take(10) } };
        Assert.Equal(small, StatusService.Fit(small.Clone(), StatusService.MaxReplyBytes));
    }

    [Fact(Timeout = 90_000)]
    public async Task NamesAndReasonsFromWorkersCannotForgeLogLines()
    {
        var port = Cluster.FreePort();
        var address = new Uri($"http://127.0.0.1:{port}");
        var tokenFile = Path.Combine(Dir, "token");
        Token.WriteFile(tokenFile, Cluster.Token);
        using var serve = new CoordinatorProcess(["serve", "--listen", address.ToString(), "--recipe", "swissroll", .. Cluster.Sets().SelectMany(s => new[] { "--set", s }),
            "--steps", "5", "--out", Path.Combine(Dir, "run"), "--token-file", tokenFile, "--log-level", "information"]);
        using (var probe = ClientChannel.Create(address))
            await Cluster.WaitUntil(() => Healthy(probe), TimeSpan.FromSeconds(60), "the coordinator to serve", () => serve.Output);

        const string forged = "12:00:00.000 WRN forged";
        var join = GoodJoin();
        join.Host = "evil\n" + forged;
        await using (var w = RawWorker.Open(address, Cluster.Token))
        {
            await w.SendAsync(new WorkerMessage { Join = join });
            Assert.Equal(StatusCode.InvalidArgument, (await w.FailureAsync()).StatusCode);
        }
        // A worker that joins properly and leaves with a multi-line reason: the reason is logged escaped, on one line.
        await using (var w = await RawWorker.JoinAsync(address))
        {
            await w.SendAsync(new WorkerMessage { Leave = new Leave { WorkerId = w.Welcome.WorkerId, Reason = "bye\n" + forged } });
            await Cluster.WaitUntil(() => serve.Output.Contains(@"bye\n" + forged, StringComparison.Ordinal), TimeSpan.FromSeconds(20), "the leave to be logged", () => serve.Output);
        }
        await Cluster.WaitUntil(() => serve.Output.Contains("join.host holds the control character", StringComparison.Ordinal), TimeSpan.FromSeconds(20), "the refusal to be logged", () => serve.Output);
        Assert.DoesNotContain(serve.Output.Split('\n'), line => line.StartsWith(forged, StringComparison.Ordinal));
    }

    private static bool Healthy(Grpc.Net.Client.GrpcChannel channel)
    {
        try
        {
            return new Health.HealthClient(channel).Check(new HealthCheckRequest(), deadline: DateTime.UtcNow.AddSeconds(2)).Status == HealthCheckResponse.Types.ServingStatus.Serving;
        }
        catch (RpcException)
        {
            return false;
        }
    }
}
