using System.Diagnostics;
using System.Runtime.InteropServices;
using DistDiffusion.Coordinator.Server;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Sampling;
using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;
using Grpc.Core;
using static TorchSharp.torch;
using ModelSamplerKind = DistDiffusion.Model.Diffusion.SamplerKind;
using SampleRequest = DistDiffusion.Protocol.V1.SampleRequest;

namespace DistDiffusion.Tests.Distributed;

/// <summary>
/// Sampling over the workers: the same request gives the same samples (those of one-process sampling) however many
/// workers serve it and whatever happens to them; bad requests get specific codes; training is not disturbed.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class SamplingTests() : TempFolderTest("dd-sampling")
{

    /// <summary>A small trained model on disk (20 local steps of the cluster recipe).</summary>
    private string TrainedRun(string name = "trained", Func<DistDiffusion.Model.Training.Recipe, DistDiffusion.Model.Training.Recipe>? adjust = null)
    {
        var run = Path.Combine(Dir, name);
        var recipe = Cluster.Recipe(20);
        Cluster.LocalReference(adjust?.Invoke(recipe) ?? recipe, run).DisposeTensors();
        return run;
    }

    private async Task<CoordinatorServer> ServeSamples(string run, Action<CoordinatorOptions>? adjust = null)
    {
        var o = new CoordinatorOptions { Listen = "http://127.0.0.1:0", Checkpoint = run, SampleOnly = true, HeartbeatSeconds = 1, SampleWaitSeconds = 20 };
        adjust?.Invoke(o);
        return await Cluster.Start(o);
    }

    /// <summary>One-process samples of the run's EMA weights: the reference every distributed answer must equal.</summary>
    private static float[] LocalSamples(string run, int n, long seed, ModelSamplerKind kind = ModelSamplerKind.Ddpm, int steps = 0, double eta = 0)
    {
        var data = CheckpointStore.Load(CheckpointStore.ResolveCheckpointFolder(run));
        try
        {
            using var model = DiffusionModel.FromCheckpoint(data, useEma: true, CPU);
            using var result = model.Sample(new DistDiffusion.Model.Sampling.SampleRequest(n, kind, steps, eta, seed), 64);
            return result.Samples.contiguous().data<float>().ToArray();
        }
        finally
        {
            data.DisposeTensors();
        }
    }

    private static async Task<(float[] Values, List<SampleProgress> Progress)> Sample(Uri address, SampleRequest request, CancellationToken ct = default)
    {
        using var channel = ClientChannel.Create(address);
        using var call = new Sampler.SamplerClient(channel).Sample(request, Token.Headers(Cluster.Token), DateTime.UtcNow.AddSeconds(120), ct);
        var values = new List<float>();
        var progress = new List<SampleProgress>();
        uint expected = 0;
        while (await call.ResponseStream.MoveNext(ct))
        {
            var m = call.ResponseStream.Current;
            if (m.KindCase == SampleResponse.KindOneofCase.Progress) { progress.Add(m.Progress); continue; }
            Assert.Equal(expected++, m.Result.Index);   // results arrive in sample order
            values.AddRange(MemoryMarshal.Cast<byte, float>(m.Result.Tensor.Span).ToArray());
        }
        Assert.Equal(request.Count, expected);
        return ([.. values], progress);
    }

    private static void AssertClose(float[] expected, float[] actual)
    {
        Assert.Equal(expected.Length, actual.Length);
        var worst = expected.Zip(actual, (a, b) => Math.Abs(a - b)).Max();
        Assert.True(worst <= 1e-4f, $"samples differ by up to {worst}");
    }

    [Fact(Timeout = 180_000)]
    public async Task TheSameRequestGivesTheOneProcessSamplesWithOneOrThreeWorkersAndAfterLosingOne()
    {
        var run = TrainedRun();
        var expected = LocalSamples(run, 300, seed: 5);
        var ddimExpected = LocalSamples(run, 300, seed: 5, ModelSamplerKind.Ddim, steps: 10, eta: 0.5);
        await using var server = await ServeSamples(run);
        var workers = new List<WorkerProcess> { new(server.Address, Cluster.Token) };
        try
        {
            await Cluster.WaitUntil(() => server.Loop.Status().Workers.Count == 1, TimeSpan.FromSeconds(60), "one worker");
            var (one, progress) = await Sample(server.Address, new SampleRequest { Count = 300, Seed = 5 });
            AssertClose(expected, one);
            Assert.Equal(300u, progress[^1].Done);
            Assert.Equal(Weights.Ema, progress[0].Weights);
            Assert.Equal(20UL, progress[0].ParameterVersion);

            workers.Add(new WorkerProcess(server.Address, Cluster.Token));
            workers.Add(new WorkerProcess(server.Address, Cluster.Token));
            await Cluster.WaitUntil(() => server.Loop.Status().Workers.Count == 3, TimeSpan.FromSeconds(60), "three workers");
            var (three, p3) = await Sample(server.Address, new SampleRequest { Count = 300, Seed = 5 });
            AssertClose(expected, three);
            Assert.Equal(3u, p3[0].Workers);
            var (ddim, _) = await Sample(server.Address, new SampleRequest { Count = 300, Seed = 5, Sampler = SamplerKind.Ddim, Steps = 10, Eta = 0.5 });
            AssertClose(ddimExpected, ddim);

            // Kill a worker while a long request runs: its batches go to the others and the answer is unchanged.
            var big = LocalSamples(run, 3000, seed: 9);
            var request = Sample(server.Address, new SampleRequest { Count = 3000, Seed = 9 });
            await Task.Delay(300);
            workers[0].Kill();
            var (survived, _) = await request;
            AssertClose(big, survived);
        }
        finally
        {
            foreach (var w in workers) w.Dispose();
        }
    }

    [Fact(Timeout = 180_000)]
    public async Task ConcurrentClientsEachGetTheirOwnSamples()
    {
        var run = TrainedRun();
        await using var server = await ServeSamples(run);
        using var w1 = new WorkerProcess(server.Address, Cluster.Token);
        using var w2 = new WorkerProcess(server.Address, Cluster.Token);
        await Cluster.WaitUntil(() => server.Loop.Status().Workers.Count == 2, TimeSpan.FromSeconds(60), "two workers");
        var seeds = new long[] { 1, 2, 3 };
        var answers = await Task.WhenAll(seeds.Select(s => Sample(server.Address, new SampleRequest { Count = 200, Seed = s })));
        for (var i = 0; i < seeds.Length; i++) AssertClose(LocalSamples(run, 200, seeds[i]), answers[i].Values);

    }

    [Fact(Timeout = 180_000)]
    public async Task CancellingARequestStopsTheWorkersChains()
    {
        // Slow chains (T = 1000, a wider network) so the cancel surely lands while they run.
        var run = TrainedRun("slow", r => r with { Timesteps = 1000, HiddenSize = 256, Steps = 2 });
        await using var server = await ServeSamples(run);
        using var w1 = new WorkerProcess(server.Address, Cluster.Token);
        using var w2 = new WorkerProcess(server.Address, Cluster.Token);
        await Cluster.WaitUntil(() => server.Loop.Status().Workers.Count == 2, TimeSpan.FromSeconds(60), "two workers");
        using var cts = new CancellationTokenSource();
        var abandoned = Sample(server.Address, new SampleRequest { Count = 10_000, Seed = 4 }, cts.Token);
        await Task.Delay(1500);
        await cts.CancelAsync();
        var e = await Assert.ThrowsAnyAsync<Exception>(() => abandoned);
        Assert.True(e is OperationCanceledException or RpcException { StatusCode: StatusCode.Cancelled }, e.ToString());
        await Cluster.WaitUntil(() => (w1.Output + w2.Output).Contains("cancelled", StringComparison.Ordinal), TimeSpan.FromSeconds(20),
            "a worker to stop its chains", () => w1.Output + "\n" + w2.Output);
        // The workers are free again at once: a small request is served right away.
        var clock = Stopwatch.StartNew();
        var (after, _) = await Sample(server.Address, new SampleRequest { Count = 4, Seed = 6 });
        AssertClose(LocalSamples(run, 4, 6), after);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"a request after the cancel took {clock.Elapsed}");
    }

    public static TheoryData<string, StatusCode> BadRequests => new()
    {
        { "count 0", StatusCode.InvalidArgument },
        { "count over the limit", StatusCode.ResourceExhausted },
        { "ddim steps over T", StatusCode.InvalidArgument },
        { "ddpm with fewer steps", StatusCode.InvalidArgument },
        { "unknown sampler", StatusCode.InvalidArgument },
        { "eta out of range", StatusCode.InvalidArgument },
        { "png of 2-D points", StatusCode.InvalidArgument },
        { "no token", StatusCode.Unauthenticated },
        { "no worker", StatusCode.Unavailable },
    };

    [Theory(Timeout = 120_000)]
    [MemberData(nameof(BadRequests))]
    public async Task ABadRequestGetsItsStatusAndTrainingContinuesUndisturbed(string kind, StatusCode expected)
    {
        var options = Cluster.Options(Path.Combine(Dir, "run"), steps: 100_000);
        options.MaxSamplesPerRequest = 500;
        options.SampleWaitSeconds = 1;
        await using var server = await Cluster.Start(options);
        using var worker = kind == "no worker" ? null : new WorkerProcess(server.Address, Cluster.Token);
        if (worker is not null) await Cluster.WaitUntil(() => server.Loop.StepsDone >= 3, TimeSpan.FromSeconds(60), "training to run", () => worker.Output);
        var request = kind switch
        {
            "count 0" => new SampleRequest { Count = 0 },
            "count over the limit" => new SampleRequest { Count = 501 },
            "ddim steps over T" => new SampleRequest { Count = 4, Sampler = SamplerKind.Ddim, Steps = 51 },
            "ddpm with fewer steps" => new SampleRequest { Count = 4, Sampler = SamplerKind.Ddpm, Steps = 10 },
            "unknown sampler" => new SampleRequest { Count = 4, Sampler = (SamplerKind)9 },
            "eta out of range" => new SampleRequest { Count = 4, Sampler = SamplerKind.Ddim, Steps = 10, Eta = 1.5 },
            "png of 2-D points" => new SampleRequest { Count = 4, Png = true },
            _ => new SampleRequest { Count = 4 },
        };
        using var channel = ClientChannel.Create(server.Address);
        var client = new Sampler.SamplerClient(channel);
        var headers = Token.Headers(kind == "no token" ? null : Cluster.Token);
        var e = await Assert.ThrowsAsync<RpcException>(async () =>
        {
            using var call = client.Sample(request, headers, DateTime.UtcNow.AddSeconds(60));
            while (await call.ResponseStream.MoveNext(CancellationToken.None)) { }
        });
        Assert.Equal(expected, e.StatusCode);
        Assert.False(string.IsNullOrWhiteSpace(e.Status.Detail));
        if (worker is not null)
        {
            // Training goes on, and a good request is served while it does.
            var step = server.Loop.StepsDone;
            var (values, progress) = await Sample(server.Address, new SampleRequest { Count = 30, Seed = 1 });
            Assert.Equal(60, values.Length);
            Assert.Single(progress.Select(p => p.ParameterVersion).Distinct());   // one consistent model per request
            await Cluster.WaitUntil(() => server.Loop.StepsDone > step + 3, TimeSpan.FromSeconds(30), "training to continue", () => worker.Output);
        }
    }

    [Fact(Timeout = 120_000)]
    public async Task TheSampleVerbAsksACoordinatorAndWritesWhatOneProcessSamplingWrites()
    {
        var run = TrainedRun();
        await using var server = await ServeSamples(run);
        using var worker = new WorkerProcess(server.Address, Cluster.Token);
        var tokenFile = Path.Combine(Dir, "token");
        Token.WriteFile(tokenFile, Cluster.Token);
        var remote = Path.Combine(Dir, "remote.npy");
        var local = Path.Combine(Dir, "local.npy");
        Assert.Equal(0, DistDiffusion.Coordinator.Cli.CoordinatorCli.Run(["sample", "--address", server.Address.ToString(), "--token-file", tokenFile, "--n", "100", "--seed", "7", "--out", remote]));
        Assert.Equal(0, DistDiffusion.Coordinator.Cli.CoordinatorCli.Run(["sample", "--checkpoint", run, "--n", "100", "--seed", "7", "--out", local]));
        using var a = DistDiffusion.Model.Imaging.Npy.Read(remote);
        using var b = DistDiffusion.Model.Imaging.Npy.Read(local);
        Assert.True((a - b).abs().max().item<float>() <= 1e-4f);
        Assert.Equal(2, DistDiffusion.Coordinator.Cli.CoordinatorCli.Run(["sample", "--address", server.Address.ToString(), "--checkpoint", run, "--out", remote]));
    }
}
