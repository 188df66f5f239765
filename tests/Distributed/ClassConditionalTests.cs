using System.Runtime.InteropServices;
using DistDiffusion.Coordinator.Configuration;
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
/// A class-conditional recipe end to end over real gRPC between real processes: two workers train it to the one-process
/// parameters bit for bit (labels and label dropout drawn per sample, like t), then serve guided samples of a chosen
/// class, or of the classes in turn, equal to one-process sampling; requests its model cannot take are refused by name.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class ClassConditionalTests() : TempFolderTest("dd-classes")
{
    private const int Steps = 4;

    /// <summary>mnist-cpu-guided shrunk to a tiny U-Net; a third of the labels dropped so every batch trains both models.</summary>
    private static string[] Sets() =>
    [
        "base-channels=8", "group-norm-groups=4", "channel-multipliers=1,2", "attention-heads=1", "attention-head-size=8", "timesteps=20",
        "batch-size=16", "micro-batches=4", "label-dropout=0.3", "checkpoint-every=0", "sample-every=0", $"data-path={Repository.PathOf("data/mnist")}",
    ];

    private static float[] LocalSamples(string run, SamplingRequest request)
    {
        var data = CheckpointStore.Load(CheckpointStore.ResolveCheckpointFolder(run));
        try
        {
            using var model = DiffusionModel.FromCheckpoint(data, useEma: true, CPU);
            // At one intra-op thread and in batches of 5, the workers' here: the U-Net's kernels give other bits on other thread
            // counts and batch sizes, which guidance's extrapolation magnifies (5e-4 against batches of 20).
            var before = get_num_threads();
            DistDiffusion.Model.TorchRuntime.UseIntraOpThreads(1);
            try
            {
                using var result = model.Sample(request, batchSize: 5);   // the coordinator's batches: 20 samples, 2 per worker
                return result.Samples.contiguous().data<float>().ToArray();
            }
            finally
            {
                DistDiffusion.Model.TorchRuntime.UseIntraOpThreads(before);
            }
        }
        finally
        {
            data.DisposeTensors();
        }
    }

    private static async Task<float[]> RemoteSamples(Uri address, SampleRequest request)
    {
        using var channel = ClientChannel.Create(address);
        using var call = new Sampler.SamplerClient(channel).Sample(request, Token.Headers(Cluster.Token), DateTime.UtcNow.AddSeconds(120));
        var values = new List<float>();
        while (await call.ResponseStream.MoveNext(CancellationToken.None))
            if (call.ResponseStream.Current.KindCase == SampleResponse.KindOneofCase.Result)
                values.AddRange(MemoryMarshal.Cast<byte, float>(call.ResponseStream.Current.Result.Tensor.Span).ToArray());
        return [.. values];
    }

    private static void AssertClose(float[] expected, float[] actual, string what)
    {
        Assert.Equal(expected.Length, actual.Length);
        var worst = expected.Zip(actual, (a, b) => Math.Abs(a - b)).Max();
        Assert.True(worst <= 1e-4f, $"{what}: samples differ by up to {worst}");
    }

    [Fact(Timeout = 300_000)]
    public async Task TwoWorkersTrainItToTheOneProcessBitsAndServeGuidedSamplesOfAChosenClass()
    {
        var recipe = Recipes.Get("mnist-cpu-guided").WithOverrides(Sets()) with { Steps = Steps, Seed = 11 };
        var reference = Cluster.LocalReference(recipe, Path.Combine(Dir, "local"));
        var runDir = Path.Combine(Dir, "dist");
        try
        {
            await using (var server = await Cluster.Start(new CoordinatorOptions
            {
                Listen = "http://127.0.0.1:0", Out = runDir, Recipe = "mnist-cpu-guided", Set = Sets(), Steps = Steps, Seed = 11,
                MinWorkers = 2, StepDeadlineSeconds = 60, HeartbeatSeconds = 1,
            }))
            {
                using var w1 = new WorkerProcess(server.Address, Cluster.Token);
                using var w2 = new WorkerProcess(server.Address, Cluster.Token);
                try
                {
                    await server.Loop.Completion.WaitAsync(TimeSpan.FromSeconds(200));
                }
                catch (TimeoutException)
                {
                    Assert.Fail("training did not complete\n" + w1.Output + "\n" + w2.Output);
                }
                Assert.Equal(2, server.Loop.Status().Workers.Count);
                Cluster.AssertSameState(reference, Cluster.Latest(runDir), w1.Output + "\n" + w2.Output);
                Assert.Contains("class_emb.weight", reference.Model.Keys);
            }
        }
        finally
        {
            reference.DisposeTensors();
        }

        // The trained model's samples over two workers: a chosen class with guidance 3, and the defaults (classes in turn, the recipe's 1.25).
        var guided = LocalSamples(runDir, new SamplingRequest(20, SamplingMethod.Ddim, 5, 0.5, 7, Conditioning: new ClassGuidance(Class: 3, Guidance: 3)));
        var inTurn = LocalSamples(runDir, new SamplingRequest(20, SamplingMethod.Ddpm, 0, 0, 7));
        var recipeScale = LocalSamples(runDir, new SamplingRequest(20, SamplingMethod.Ddpm, 0, 0, 7, Conditioning: new ClassGuidance(Guidance: 1.25)));
        var unguided = LocalSamples(runDir, new SamplingRequest(20, SamplingMethod.Ddpm, 0, 0, 7, Conditioning: new ClassGuidance(Guidance: 1)));
        AssertClose(recipeScale, inTurn, "the recipe's guidance 1.25 named and unnamed");
        Assert.NotEqual(unguided, inTurn);
        await using var sampling = await Cluster.Start(new CoordinatorOptions
        {
            Listen = "http://127.0.0.1:0", Checkpoint = runDir, SampleOnly = true, HeartbeatSeconds = 1, SampleWaitSeconds = 20,
        });
        using var s1 = new WorkerProcess(sampling.Address, Cluster.Token);
        using var s2 = new WorkerProcess(sampling.Address, Cluster.Token);
        await Cluster.WaitUntil(() => sampling.Sampling.WorkerCount == 2, TimeSpan.FromSeconds(60), "two workers", () => s1.Output + "\n" + s2.Output);
        AssertClose(guided, await RemoteSamples(sampling.Address, new SampleRequest { Count = 20, Seed = 7, Sampler = SamplerKind.Ddim, Steps = 5, Eta = 0.5, ClassLabel = 3, Guidance = 3 }), "class 3, guidance 3");
        AssertClose(inTurn, await RemoteSamples(sampling.Address, new SampleRequest { Count = 20, Seed = 7 }), "classes in turn, the recipe's guidance");

        // What the model cannot take is refused, naming the field and the value.
        foreach (var (bad, expected) in new[]
        {
            (new SampleRequest { Count = 4, ClassLabel = 10 }, "class_label = 10: expected 0..9"),
            (new SampleRequest { Count = 4, ClassLabel = -2 }, "class_label = -2"),
            (new SampleRequest { Count = 4, Guidance = -1 }, "guidance = -1"),
            (new SampleRequest { Count = 4, Guidance = double.PositiveInfinity }, "guidance = Infinity"),
        })
        {
            var e = await Assert.ThrowsAsync<RpcException>(() => RemoteSamples(sampling.Address, bad));
            Assert.Equal(StatusCode.InvalidArgument, e.StatusCode);
            Assert.Contains(expected, e.Status.Detail);
        }
        Assert.Equal(2, sampling.Sampling.WorkerCount);   // the workers are unaffected
    }
}
