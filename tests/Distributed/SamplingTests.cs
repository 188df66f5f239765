using System.Diagnostics;
using System.Runtime.InteropServices;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Hosting;
using DistDiffusion.Coordinator.Sampling;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Sampling;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Grpc.Core;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Distributed;

/// <summary>
/// Sampling over the workers: the same request gives the same samples (those of one-process sampling) however many
/// workers serve it and whatever happens to them; bad requests get specific codes; training is not disturbed.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class SamplingTests() : TempFolderTest("dd-sampling")
{

    /// <summary>A small trained model on disk (20 local steps of the cluster recipe).</summary>
    private string TrainedRun(string name = "trained", Func<Recipe, Recipe>? adjust = null)
    {
        var run = Path.Combine(Dir, name);
        var recipe = Cluster.Recipe(20);
        Cluster.LocalReference(adjust?.Invoke(recipe) ?? recipe, run).DisposeTensors();
        return run;
    }

    private static async Task<CoordinatorServer> ServeSamples(string run, Action<CoordinatorOptions>? adjust = null)
    {
        var o = new CoordinatorOptions { Listen = "http://127.0.0.1:0", Checkpoint = run, SampleOnly = true, HeartbeatSeconds = 1, SampleWaitSeconds = 20 };
        adjust?.Invoke(o);
        return await Cluster.Start(o);
    }

    /// <summary>One-process samples of the run's EMA weights: the reference every distributed answer must equal.</summary>
    private static float[] LocalSamples(string run, int n, long seed, SamplingMethod kind = SamplingMethod.Ddpm, int steps = 0, double eta = 0)
    {
        var data = CheckpointStore.Load(CheckpointStore.ResolveCheckpointFolder(run));
        try
        {
            using var model = DiffusionModel.FromCheckpoint(data, useEma: true, CPU);
            using var result = model.Sample(new SamplingRequest(n, kind, steps, eta, seed), 64);
            return result.Samples.contiguous().data<float>().ToArray();
        }
        finally
        {
            data.DisposeTensors();
        }
    }

    /// <summary>What a Sample call returned: samples in index order, each sample's trajectory frames, the result messages.</summary>
    private sealed record Answer(float[] Values, List<float[]>[] Frames, int Results, List<SampleProgress> Progress);

    private static async Task<Answer> SampleAll(Uri address, SampleRequest request, double deadlineSeconds = 120, CancellationToken ct = default)
    {
        using var channel = ClientChannel.Create(address);
        using var call = new Sampler.SamplerClient(channel).Sample(request, Token.Headers(Cluster.Token), DateTime.UtcNow.AddSeconds(deadlineSeconds), ct);
        var samples = new List<float[]>();
        var frames = new List<float[]>[request.Count];
        var progress = new List<SampleProgress>();
        var results = 0;
        while (await call.ResponseStream.MoveNext(ct))
        {
            var m = call.ResponseStream.Current;
            if (m.KindCase == SampleResponse.KindOneofCase.Progress) { progress.Add(m.Progress); continue; }
            results++;
            var r = m.Result;
            var trajectory = r.Trajectory.Select(f => MemoryMarshal.Cast<byte, float>(f.Span).ToArray());
            if (r.TrajectoryOffset > 0)
            {
                // The rest of a trajectory too long for one message: right after the sample's first result.
                Assert.Equal(samples.Count - 1, (int)r.Index);
                Assert.Equal(frames[r.Index].Count, (int)r.TrajectoryOffset);
                frames[r.Index].AddRange(trajectory);
                continue;
            }
            Assert.Equal(samples.Count, (int)r.Index);   // results arrive in sample order
            samples.Add(MemoryMarshal.Cast<byte, float>(r.Tensor.Span).ToArray());
            frames[r.Index] = [.. trajectory];
        }
        Assert.Equal((int)request.Count, samples.Count);
        return new Answer([.. samples.SelectMany(v => v)], frames, results, progress);
    }

    private static async Task<(float[] Values, List<SampleProgress> Progress)> Sample(Uri address, SampleRequest request, double deadlineSeconds = 120, CancellationToken ct = default)
    {
        var answer = await SampleAll(address, request, deadlineSeconds, ct);
        return (answer.Values, answer.Progress);
    }

    /// <summary>One-process samples and trajectory frames (each [n, ...] flattened) of the run's EMA weights.</summary>
    private static (float[] Values, float[][] Frames) LocalTrajectory(string run, int n, long seed, int every)
    {
        var data = CheckpointStore.Load(CheckpointStore.ResolveCheckpointFolder(run));
        try
        {
            using var model = DiffusionModel.FromCheckpoint(data, useEma: true, CPU);
            using var result = model.Sample(new SamplingRequest(n, SamplingMethod.Ddpm, 0, 0, seed, 0, every), 64);
            return (result.Samples.contiguous().data<float>().ToArray(), [.. result.Trajectory.Select(f => f.contiguous().data<float>().ToArray())]);
        }
        finally
        {
            data.DisposeTensors();
        }
    }

    /// <summary>Each sample's frames (as the service returns them) against the one-process frames [frame][n, ...].</summary>
    private static void AssertSameTrajectories(float[][] expected, List<float[]>[] actual)
    {
        var elements = expected[0].Length / actual.Length;
        for (var i = 0; i < actual.Length; i++)
        {
            Assert.Equal(expected.Length, actual[i].Count);
            for (var f = 0; f < expected.Length; f++)
                AssertClose(expected[f].AsSpan(i * elements, elements).ToArray(), actual[i][f]);
        }
    }

    /// <summary>An untrained image model (a small U-Net on 3 x size x size images) with T steps, as a checkpoint.</summary>
    private string ImageRun(string name, int timesteps, int size)
    {
        var recipe = Recipes.MnistSmall with
        {
            Dataset = DistDiffusion.Model.Data.DatasetKind.ImageFolder, ImageSize = size,
            BaseChannels = 8, GroupNormGroups = 4, ChannelMultipliers = [1, 2], AttentionHeads = 1, AttentionHeadSize = 8, BatchSize = 4,
            Timesteps = timesteps, DataPath = "unused",
        };
        using var state = DistDiffusion.Model.Training.TrainingState.Create(recipe, recipe.SampleShape, 40, CPU);
        var run = Path.Combine(Dir, name);
        CheckpointStore.Save(run, state.ToCheckpoint());
        return run;
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
        var ddimExpected = LocalSamples(run, 300, seed: 5, SamplingMethod.Ddim, steps: 10, eta: 0.5);
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
        var abandoned = Sample(server.Address, new SampleRequest { Count = 10_000, Seed = 4 }, ct: cts.Token);
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
        { "class of an unconditional model", StatusCode.InvalidArgument },
        { "guidance of an unconditional model", StatusCode.InvalidArgument },
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
            "class of an unconditional model" => new SampleRequest { Count = 4, ClassLabel = 1 },
            "guidance of an unconditional model" => new SampleRequest { Count = 4, Guidance = 2 },
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

    [Fact(Timeout = 180_000)]
    public async Task ALongImageTrajectoryComesInPiecesUnderTheMessageLimitsAndEqualsOneProcessSampling()
    {
        // One 3x64x64 sample with every one of T = 30 steps is 31 frames, 1.52 MB: more than a worker's message may be
        // (1 MiB + 64 KiB), like a 28x28 one with all of T = 400 steps (1.26 MB), at a tenth of the compute. The worker
        // sends it as header + chunks and the service as several results per sample.
        var run = ImageRun("t30", timesteps: 30, size: 64);
        var (expected, expectedFrames) = LocalTrajectory(run, 2, seed: 3, every: 1);
        await using var server = await ServeSamples(run);
        using var worker = new WorkerProcess(server.Address, Cluster.Token);
        var answer = await SampleAll(server.Address, new SampleRequest { Count = 2, Seed = 3, TrajectoryEvery = 1 }, deadlineSeconds: 150);
        AssertClose(expected, answer.Values);
        AssertSameTrajectories(expectedFrames, answer.Frames);
        Assert.True(answer.Results > 2, $"{answer.Results} result messages for 2 samples of 1.52 MB each");
        Assert.DoesNotContain("Rejected", worker.Output, StringComparison.Ordinal);

        // The sample verb puts the pieces together too.
        var tokenFile = Path.Combine(Dir, "token");
        Token.WriteFile(tokenFile, Cluster.Token);
        var remote = Path.Combine(Dir, "remote.npy");
        Assert.Equal(0, DistDiffusion.Coordinator.Cli.CoordinatorCli.Run(["sample", "--address", server.Address.ToString(), "--token-file", tokenFile,
            "--n", "2", "--seed", "3", "--trajectory-every", "1", "--timeout", "150", "--out", remote]));
        using var written = DistDiffusion.Model.Imaging.Npy.Read(remote);
        AssertClose(expected, written.contiguous().data<float>().ToArray());
        Assert.True(File.Exists(Path.Combine(Dir, "remote-trajectory.png")));
    }

    [Fact(Timeout = 60_000)]
    public async Task ATrajectoryTooLargeForOneSampleIsRefusedUpFrontNamingTheValueAndTheLimit()
    {
        // T = 400: every step of one 3x64x64 sample is 19.7 MB, over the 16 MiB one sample may take; every 2nd step fits.
        var run = ImageRun("t400", timesteps: 400, size: 64);
        await using var server = await ServeSamples(run);
        using var channel = ClientChannel.Create(server.Address);
        var e = await Assert.ThrowsAsync<RpcException>(async () =>
        {
            using var call = new Sampler.SamplerClient(channel).Sample(new SampleRequest { Count = 1, TrajectoryEvery = 1 }, Token.Headers(Cluster.Token), DateTime.UtcNow.AddSeconds(30));
            while (await call.ResponseStream.MoveNext(CancellationToken.None)) { }
        });
        Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
        Assert.Contains("trajectory_every 1", e.Status.Detail, StringComparison.Ordinal);
        Assert.Contains(SamplingCoordinator.MaxSampleBytes.ToString(System.Globalization.CultureInfo.InvariantCulture), e.Status.Detail, StringComparison.Ordinal);
        Assert.Contains("trajectory_every 2 or more", e.Status.Detail, StringComparison.Ordinal);
    }

    [Fact(Timeout = 180_000)]
    public async Task AWorkerThatGoesSilentInKeepServingIsDroppedAndItsBatchesGoToAnother()
    {
        var options = Cluster.Options(Path.Combine(Dir, "run"), steps: 3);
        options.KeepServing = true;
        options.SampleWaitSeconds = 30;
        await using var server = await Cluster.Start(options);
        using var worker = new WorkerProcess(server.Address, Cluster.Token);
        await Cluster.WaitUntil(() => server.Loop.Status().State == RunState.Complete, TimeSpan.FromSeconds(60), "training to complete", () => worker.Output);
        var expected = LocalSamples(Path.Combine(Dir, "run"), 200, seed: 3);
        await using var silent = await RawWorker.JoinAsync(server.Address);
        silent.StartHeartbeats();
        await Cluster.WaitUntil(() => server.Sampling.WorkerCount == 2, TimeSpan.FromSeconds(30), "two workers for sampling");

        // 4 batches: two for each worker. The raw one takes its two and falls silent.
        var request = Sample(server.Address, new SampleRequest { Count = 200, Seed = 3 }, deadlineSeconds: 90);
        await silent.NextSampleWorkAsync();
        await silent.StopHeartbeatsAsync();
        var (values, _) = await request;
        AssertClose(expected, values);

        var error = await silent.FailureAsync();
        Assert.Equal(StatusCode.DeadlineExceeded, error.StatusCode);
        Assert.Contains("silent for", error.Status.Detail, StringComparison.Ordinal);
        await Cluster.WaitUntil(() => server.Loop.Status().Workers.Any(w => w.Id == silent.Welcome.WorkerId && w.State == WorkerState.Dropped),
            TimeSpan.FromSeconds(10), "the silent worker to show as dropped");
    }

    [Fact(Timeout = 180_000)]
    public async Task AWorkerSittingOnASamplingBatchPastTheDeadlineIsDroppedAndTheBatchGoesToAnother()
    {
        var run = TrainedRun();
        var expected = LocalSamples(run, 200, seed: 4);
        await using var server = await ServeSamples(run, o => o.SampleBatchDeadlineSeconds = 5);
        using var worker = new WorkerProcess(server.Address, Cluster.Token);
        await Cluster.WaitUntil(() => server.Sampling.WorkerCount == 1, TimeSpan.FromSeconds(60), "a worker", () => worker.Output);
        await using var stuck = await RawWorker.JoinAsync(server.Address);
        stuck.StartHeartbeats();   // alive, but it never returns its batches
        await Cluster.WaitUntil(() => server.Sampling.WorkerCount == 2, TimeSpan.FromSeconds(30), "two workers for sampling");

        var request = Sample(server.Address, new SampleRequest { Count = 200, Seed = 4 }, deadlineSeconds: 90);
        await stuck.NextSampleWorkAsync();
        var (values, _) = await request;
        AssertClose(expected, values);

        var error = await stuck.FailureAsync();
        Assert.Equal(StatusCode.DeadlineExceeded, error.StatusCode);
        Assert.Contains("sampling deadline of 5 s", error.Status.Detail, StringComparison.Ordinal);
        await Cluster.WaitUntil(() => server.Loop.Status().Workers.Any(w => w.Id == stuck.Welcome.WorkerId && w.State == WorkerState.Dropped),
            TimeSpan.FromSeconds(10), "the stuck worker to show as dropped");
    }

    public static TheoryData<string> MalformedOutputs => new()
    {
        "a trajectory frame too short",
        "a trajectory frame missing",
        "samples of the wrong length",
        "chunks that fail their checksum",
    };

    [Theory(Timeout = 120_000)]
    [MemberData(nameof(MalformedOutputs))]
    public async Task AWorkerSendingAMalformedBatchIsDroppedAndTheBatchIsComputedElsewhere(string kind)
    {
        var run = TrainedRun();
        var (expected, expectedFrames) = LocalTrajectory(run, 40, seed: 8, every: 10);
        await using var server = await ServeSamples(run);
        using var worker = new WorkerProcess(server.Address, Cluster.Token);
        await Cluster.WaitUntil(() => server.Sampling.WorkerCount == 1, TimeSpan.FromSeconds(60), "a worker", () => worker.Output);
        await using var bad = await RawWorker.JoinAsync(server.Address);
        bad.StartHeartbeats();
        await Cluster.WaitUntil(() => server.Sampling.WorkerCount == 2, TimeSpan.FromSeconds(30), "two workers for sampling");

        var request = SampleAll(server.Address, new SampleRequest { Count = 40, Seed = 8, TrajectoryEvery = 10 }, deadlineSeconds: 90);
        var work = await bad.NextSampleWorkAsync();
        var bytes = (int)work.Count * 2 * 4;   // 2-D points, float32
        const int frames = 6;                   // x_T, every 10th of 50 steps
        var output = new SampleOutput { JobId = work.JobId, Batch = work.Batch, FirstIndex = work.FirstIndex, Count = work.Count };
        List<WorkerMessage> messages;
        if (kind == "chunks that fail their checksum")
        {
            var payload = new byte[bytes * (1 + frames)];
            output.Payload = TensorTransport.Header(payload, DType.Float32, payload.Length / 4, 0, 0);
            output.Payload.Checksum ^= 1;
            messages = [new() { SampleOutput = output }, .. TensorTransport.Chunks(payload, 0, 0)
                .Select(c => new WorkerMessage { SampleOutputChunk = new SampleOutputChunk { JobId = work.JobId, Batch = work.Batch, Chunk = c } })];
        }
        else
        {
            output.Samples = Google.Protobuf.ByteString.CopyFrom(new byte[kind == "samples of the wrong length" ? bytes - 4 : bytes]);
            for (var f = 0; f < (kind == "a trajectory frame missing" ? frames - 1 : frames); f++)
                output.Trajectory.Add(Google.Protobuf.ByteString.CopyFrom(new byte[kind == "a trajectory frame too short" && f == 2 ? bytes / 2 : bytes]));
            messages = [new() { SampleOutput = output }];
        }
        try
        {
            await bad.SendAllAsync(messages);
        }
        catch (RpcException)
        {
            // the coordinator may end the call while we are still writing; the status is read below
        }
        var error = await bad.FailureAsync();
        Assert.Equal(StatusCode.InvalidArgument, error.StatusCode);
        Assert.Contains($"batch {work.Batch}", error.Status.Detail, StringComparison.Ordinal);

        var answer = await request;   // the client does not notice: the batch was computed by the other worker
        AssertClose(expected, answer.Values);
        AssertSameTrajectories(expectedFrames, answer.Frames);
        await Cluster.WaitUntil(() => server.Loop.Status().Workers.Any(w => w.Id == bad.Welcome.WorkerId && w.State == WorkerState.Dropped),
            TimeSpan.FromSeconds(10), "the bad worker to show as dropped");
    }

    [Fact(Timeout = 180_000)]
    public async Task RequestsBeyondTheConcurrencyLimitGetResourceExhaustedUntilOneEnds()
    {
        var run = TrainedRun("slow", r => r with { Timesteps = 1000, HiddenSize = 256, Steps = 2 });
        await using var server = await ServeSamples(run, o => o.MaxConcurrentSampleRequests = 1);
        using var worker = new WorkerProcess(server.Address, Cluster.Token);
        await Cluster.WaitUntil(() => server.Sampling.WorkerCount == 1, TimeSpan.FromSeconds(60), "a worker", () => worker.Output);
        using var channel = ClientChannel.Create(server.Address);
        var client = new Sampler.SamplerClient(channel);
        using var cts = new CancellationTokenSource();
        using (var running = client.Sample(new SampleRequest { Count = 10_000, Seed = 1 }, Token.Headers(Cluster.Token), DateTime.UtcNow.AddSeconds(120), cts.Token))
        {
            Assert.True(await running.ResponseStream.MoveNext(CancellationToken.None));   // admitted: its first progress message
            var e = await Assert.ThrowsAsync<RpcException>(async () =>
            {
                using var call = client.Sample(new SampleRequest { Count = 4, Seed = 2 }, Token.Headers(Cluster.Token), DateTime.UtcNow.AddSeconds(30));
                while (await call.ResponseStream.MoveNext(CancellationToken.None)) { }
            });
            Assert.Equal(StatusCode.ResourceExhausted, e.StatusCode);
            Assert.Contains("MaxConcurrentSampleRequests", e.Status.Detail, StringComparison.Ordinal);
            await cts.CancelAsync();
        }
        await Cluster.WaitUntil(() => server.Sampling.Jobs().Count == 0, TimeSpan.FromSeconds(30), "the cancelled request to end");
        var (values, _) = await Sample(server.Address, new SampleRequest { Count = 4, Seed = 2 });
        AssertClose(LocalSamples(run, 4, 2), values);
    }

    [Fact(Timeout = 180_000)]
    public async Task AClientThatStopsReadingHoldsOnlyAWindowOfResultsAndIsLetGoAfterTheCallTimeout()
    {
        // T = 400 with every step kept: 3.2 KB per sample, 35 batches of 286 samples (32 MB) for 10,000 samples.
        var run = TrainedRun("t400", r => r with { Timesteps = 400, Steps = 2 });
        await using var server = await ServeSamples(run, o => o.CallTimeoutSeconds = 10);
        using var worker = new WorkerProcess(server.Address, Cluster.Token);
        await Cluster.WaitUntil(() => server.Sampling.WorkerCount == 1, TimeSpan.FromSeconds(60), "a worker", () => worker.Output);

        // A client that never reads, with HTTP/2's smallest window (64 KiB): the coordinator's writes soon wait.
        using var channel = Grpc.Net.Client.GrpcChannel.ForAddress(server.Address, new Grpc.Net.Client.GrpcChannelOptions
        {
            HttpHandler = new System.Net.Http.SocketsHttpHandler { InitialHttp2StreamWindowSize = 65535 },
            MaxReceiveMessageSize = ClientChannel.MaxReceiveMessageBytes,
        });
        using var call = new Sampler.SamplerClient(channel).Sample(new SampleRequest { Count = 10_000, Seed = 1, TrajectoryEvery = 1 },
            Token.Headers(Cluster.Token), DateTime.UtcNow.AddSeconds(120));

        // The worker computes a window of batches ahead of the client, then waits: nothing more is handed out or held.
        SamplingCoordinator.JobFigures? stalled = null;
        await Cluster.WaitUntil(() => (stalled = server.Sampling.Jobs().SingleOrDefault(j => j.Pending > 0 && j.Outstanding == 0 && j.Held > 0)) is not null,
            TimeSpan.FromSeconds(60), "the request to stop at its window", () => string.Join("\n", server.Sampling.Jobs()) + "\n" + worker.Output);
        Assert.Equal(35, stalled!.Batches);
        Assert.True(stalled.Held <= SamplingCoordinator.WindowBatchesPerWorker, stalled.ToString());
        Assert.True(stalled.HeldBytes <= SamplingCoordinator.WindowBytes, stalled.ToString());
        Assert.True(stalled.Batches - stalled.Pending <= stalled.Forwarded + SamplingCoordinator.WindowBatchesPerWorker, stalled.ToString());

        // A write that waits longer than the call timeout ends the call and the job: the worker is free again.
        await Cluster.WaitUntil(() => server.Sampling.Jobs().Count == 0, TimeSpan.FromSeconds(60), "the unread request to be let go",
            () => string.Join("\n", server.Sampling.Jobs()));
        var (values, _) = await Sample(server.Address, new SampleRequest { Count = 4, Seed = 2 });
        Assert.Equal(8, values.Length);
    }
}
