using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Hosting;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Metrics;
using DistDiffusion.Model.Sampling;
using DistDiffusion.Model.Training;
using DistDiffusion.Protocol;
using Grpc.Core;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Distributed;

/// <summary>
/// `eval --address`: the coordinator's workers compute the eval samples and the held-out bits/dim terms, split by image
/// ranges; the per-image terms are those of one-process evaluation bit for bit (at one thread), whatever the split and
/// whatever happens to a worker; the figures are those of `eval --checkpoint`, for the step the coordinator names.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class EvalTests() : TempFolderTest("dd-eval")
{
    private const long Seed = EvalCommand.Seed;
    /// <summary>The step the test checkpoints say they are of (what the figures must name).</summary>
    private const long CheckpointStep = 17;

    /// <summary>An untrained small U-Net on the repository's MNIST (held-out split of 1000 images), T steps, as a checkpoint.</summary>
    private string MnistRun(int timesteps)
    {
        var recipe = Recipes.MnistSmall with
        {
            BaseChannels = 8, GroupNormGroups = 4, ChannelMultipliers = [1, 2], AttentionHeads = 1, AttentionHeadSize = 8,
            Timesteps = timesteps, DataPath = Repository.PathOf("data/mnist"),
        };
        using var state = TrainingState.Create(recipe, recipe.SampleShape, 40, CPU);
        var run = Path.Combine(Dir, "mnist");
        var checkpoint = state.ToCheckpoint();
        var extra = new Dictionary<string, string>(checkpoint.Extra) { ["optimizer.step"] = CheckpointStep.ToString(System.Globalization.CultureInfo.InvariantCulture) };
        CheckpointStore.Save(run, checkpoint with { Step = CheckpointStep, Extra = extra });
        return run;
    }

    /// <summary>One-process per-image bits/dim of held-out images [0, m) at one intra-op thread (the workers' count here).</summary>
    private static (float[] Totals, float[] Priors) LocalBitsPerDim(string run, int m, int bpdBatch) =>
        WithLocalModel(run, (model, _, _, heldOut) =>
        {
            var (total, prior) = new LocalEvalSource(model) { BpdBatch = bpdBatch }.BitsPerDim(heldOut, m, Seed);
            using (total)
            using (prior)
                return (total.data<float>().ToArray(), prior.data<float>().ToArray());
        });

    /// <summary>
    /// Runs <paramref name="body"/> on the checkpoint's EMA model and its data (step, training and held-out sets) at one
    /// intra-op thread, the workers' count here, and releases all of it afterwards.
    /// </summary>
    private static T WithLocalModel<T>(string run, Func<DiffusionModel, long, Dataset, Dataset, T> body)
    {
        var data = CheckpointStore.Load(CheckpointStore.ResolveCheckpointFolder(run));
        try
        {
            using var model = DiffusionModel.FromCheckpoint(data, useEma: true, CPU);
            var (train, heldOut) = DatasetLoader.Load(data.Recipe.ToDataOptions());
            using (train)
            using (heldOut)
            {
                var before = get_num_threads();
                DistDiffusion.Model.TorchRuntime.UseIntraOpThreads(1);
                try
                {
                    return body(model, data.Step, train, heldOut);
                }
                finally
                {
                    DistDiffusion.Model.TorchRuntime.UseIntraOpThreads(before);
                }
            }
        }
        finally
        {
            data.DisposeTensors();
        }
    }

    private static async Task<CoordinatorServer> Serve(string run) =>
        await Cluster.Start(new CoordinatorOptions { Listen = "http://127.0.0.1:0", Checkpoint = run, SampleOnly = true, HeartbeatSeconds = 1, SampleWaitSeconds = 5 });

    private static (EvalReport Report, RemoteEval.Fetched Fetched) Remote(Uri address, int bpdImages, int bpdBatch)
    {
        using var channel = ClientChannel.Create(address);
        return RemoteEval.Evaluate(channel, Cluster.Token, 120, 2000, Math.Max(1, bpdImages), bpdBatch, false, SamplingMethod.Ddpm, 0, 0, Seed, showProgress: false, CancellationToken.None);
    }

    private static float[] Values(Tensor t)
    {
        using (t) return t.data<float>().ToArray();
    }

    private static void AssertBitIdentical(float[] expected, float[] actual, string what)
    {
        Assert.Equal(expected.Length, actual.Length);
        for (var i = 0; i < expected.Length; i++)
            Assert.True(BitConverter.SingleToInt32Bits(expected[i]) == BitConverter.SingleToInt32Bits(actual[i]),
                $"{what} of image {i}: one process {expected[i]:R}, workers {actual[i]:R}");
    }

    [Fact(Timeout = 240_000)]
    public async Task BitsPerDimOverTwoWorkersIsTheOneProcessTermsBitForBitAndTheFiguresAreEvalCheckpointsForItsStep()
    {
        var run = MnistRun(timesteps: 20);
        const int m = 40, batch = 8;   // 5 batches over 2 workers
        var (totals, priors) = LocalBitsPerDim(run, m, batch);
        await using var server = await Serve(run);
        using var w1 = new WorkerProcess(server.Address, Cluster.Token);
        using var w2 = new WorkerProcess(server.Address, Cluster.Token);
        await Cluster.WaitUntil(() => server.Sampling.WorkerCount == 2, TimeSpan.FromSeconds(60), "two workers", () => w1.Output + "\n" + w2.Output);

        var (report, fetched) = await Task.Run(() => Remote(server.Address, m, batch));
        using (fetched)
        {
            var (rt, rp) = fetched.BitsPerDim(null!, m, Seed);
            AssertBitIdentical(totals, Values(rt), "bits/dim");
            AssertBitIdentical(priors, Values(rp), "prior bits/dim");
            Assert.Equal(2, fetched.Workers);
            Assert.Equal(Protocol.V1.Weights.Ema, fetched.Progress.Weights);
            Assert.Equal((ulong)CheckpointStep, fetched.Progress.Step);
            Assert.Equal(CheckpointStep, report.Step);
            Assert.Equal(m, report.BpdImages);
            Assert.Equal(totals.Average(), report.BitsPerDim!.Value, 5);
        }

        // The one-process figures: the bits/dim line identical, the sample figures at the printed precision.
        var local = WithLocalModel(run, (model, step, train, heldOut) =>
            Evaluator.Evaluate(new LocalEvalSource(model) { BpdBatch = batch }, model.Recipe, step, train, heldOut, 2000, m, Seed));
        Assert.Equal(local.Lines().ToList(), report.Lines().ToList());

        // The verb, by address and by run folder.
        var tokenFile = Path.Combine(Dir, "token");
        Token.WriteFile(tokenFile, Cluster.Token);
        Assert.Equal(0, CoordinatorCli.Run(["eval", "--address", server.Address.ToString(), "--token-file", tokenFile, "--bpd-images", "8", "--bpd-batch", "4", "--timeout", "120"]));
        var runDir = Path.Combine(Dir, "run");
        Directory.CreateDirectory(runDir);
        RunEndpoints.Write(runDir, server.Address, null);
        Token.WriteFile(Path.Combine(runDir, "token"), Cluster.Token);
        Assert.Equal(0, CoordinatorCli.Run(["eval", "--run", runDir, "--bpd-images", "8", "--json"]));
        Assert.Equal(2, CoordinatorCli.Run(["eval", "--run", runDir, "--checkpoint", run]));
        Assert.Equal(2, CoordinatorCli.Run(["eval", "--address", server.Address.ToString(), "--token-file", tokenFile, "--bpd-images", "0"]));
        Assert.Equal(2, CoordinatorCli.Run(["eval", "--address", server.Address.ToString(), "--token-file", tokenFile, "--bpd-batch", "0"]));
    }

    [Fact(Timeout = 300_000)]
    public async Task AWorkerLostMidEvalHasItsImagesRedoneElsewhereAndTheClientFailsOnlyWhenNoWorkerRemains()
    {
        var run = MnistRun(timesteps: 60);
        const int m = 192, batch = 16;   // 12 batches over 2 workers, then 1
        var (totals, _) = LocalBitsPerDim(run, m, batch);
        await using var server = await Serve(run);
        using var w1 = new WorkerProcess(server.Address, Cluster.Token);
        using var w2 = new WorkerProcess(server.Address, Cluster.Token);
        await Cluster.WaitUntil(() => server.Sampling.WorkerCount == 2, TimeSpan.FromSeconds(60), "two workers", () => w1.Output + "\n" + w2.Output);

        var evaluation = Task.Run(() => Remote(server.Address, m, batch));
        // Kill the first worker once the bits/dim job is under way (some images sent, some still to compute).
        await Cluster.WaitUntil(() => server.Sampling.Jobs().Any(j => j.Forwarded > 0 && (j.Pending > 0 || j.Outstanding > 1)) || evaluation.IsCompleted,
            TimeSpan.FromSeconds(120), "the evaluation to be under way", () => string.Join("\n", server.Sampling.Jobs()));
        Assert.False(evaluation.IsCompleted, "the evaluation ended before a worker could be lost: make it longer");
        w1.Kill();
        var (report, fetched) = await evaluation.WaitAsync(TimeSpan.FromSeconds(180));
        using (fetched)
        {
            var (rt, rp) = fetched.BitsPerDim(null!, m, Seed);
            rp.Dispose();
            AssertBitIdentical(totals, Values(rt), "bits/dim");
            Assert.Equal(m, report.BpdImages);
        }

        // No worker left: the client gets Unavailable once the coordinator's wait (5 s here) runs out.
        w2.Kill();
        await Cluster.WaitUntil(() => server.Sampling.WorkerCount == 0, TimeSpan.FromSeconds(30), "the workers to be gone");
        var clock = System.Diagnostics.Stopwatch.StartNew();
        var e = await Assert.ThrowsAsync<RpcException>(() => Task.Run(() => Remote(server.Address, 8, batch)));
        Assert.Equal(StatusCode.Unavailable, e.StatusCode);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(60), $"the failure took {clock.Elapsed.TotalSeconds:F0} s");
    }

    [Fact(Timeout = 240_000)]
    public async Task TwoDimensionalEvalDuringTrainingPinsAStepAndBadRequestsAreRefusedNamingTheValueWithTrainingUndisturbed()
    {
        var options = Cluster.Options(Path.Combine(Dir, "train"), steps: 1_000_000);
        await using var server = await Cluster.Start(options);
        using var worker = new WorkerProcess(server.Address, Cluster.Token);
        await Cluster.WaitUntil(() => server.Loop.StepsDone >= 20, TimeSpan.FromSeconds(120), "20 training steps", () => worker.Output);

        using var channel = ClientChannel.Create(server.Address);
        var client = new Protocol.V1.Sampler.SamplerClient(channel);
        async Task<RpcException> Refused(Protocol.V1.EvalRequest request)
        {
            using var call = client.Evaluate(request, Token.Headers(Cluster.Token), DateTime.UtcNow.AddSeconds(30));
            return await Assert.ThrowsAsync<RpcException>(async () => { while (await call.ResponseStream.MoveNext(CancellationToken.None)) { } });
        }
        var before = server.Loop.StepsDone;
        var e = await Refused(new Protocol.V1.EvalRequest { Samples = 100, BpdImages = 8, HeldOutSize = 500 });
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        Assert.Contains("bpd_images 8", e.Status.Detail);
        e = await Refused(new Protocol.V1.EvalRequest());
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        e = await Refused(new Protocol.V1.EvalRequest { Samples = 100, Eta = 0.5 });
        Assert.Contains("eta 0.5", e.Status.Detail);
        e = await Refused(new Protocol.V1.EvalRequest { Samples = 1_000_000 });
        Assert.Equal(StatusCode.ResourceExhausted, e.StatusCode);
        using (var noToken = client.Evaluate(new Protocol.V1.EvalRequest { Samples = 100 }, deadline: DateTime.UtcNow.AddSeconds(30)))
            Assert.Equal(StatusCode.Unauthenticated, (await Assert.ThrowsAsync<RpcException>(async () => await noToken.ResponseStream.MoveNext(CancellationToken.None))).StatusCode);

        // A 2-D evaluation while training runs: the figures name the step of the one snapshot they used.
        var (report, fetched) = await Task.Run(() => Remote(server.Address, 0, 16));
        using (fetched)
        {
            Assert.Equal((long)fetched.Progress.Step, report.Step);
            Assert.True(report.Step >= (long)before, $"step {report.Step}, training was at {before}");
            Assert.Equal(2000, report.SampleCount);
            Assert.NotNull(report.SlicedWasserstein);
            Assert.Null(report.BitsPerDim);
        }
        var after = server.Loop.StepsDone;
        await Cluster.WaitUntil(() => server.Loop.StepsDone > after, TimeSpan.FromSeconds(60), "training to go on", () => worker.Output);
    }
}
