using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Metrics;
using DistDiffusion.Model.Networks;
using DistDiffusion.Model.Sampling;
using DistDiffusion.Model.Training;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Training;

public class TrainingTests
{
    private static Recipe TinyMlp => Recipes.SwissRoll with { HiddenSize = 32, BatchSize = 16, SyntheticSize = 64, Steps = 10, Seed = 5 };

    private static Dictionary<string, Tensor> Grads(DenoiserNetwork net) =>
        net.named_parameters().Where(p => p.parameter.grad is not null).ToDictionary(p => p.name, p => p.parameter.grad!.clone());

    [Theory]
    [InlineData("mlp")]
    [InlineData("unet-dropout")]
    [InlineData("sohl2015")]
    public void GradientOfTheGlobalBatchIsTheSumOverAnyPartition(string which)
    {
        using var scope = NewDisposeScope();
        var recipe = which switch
        {
            "mlp" => TinyMlp,
            "sohl2015" => Recipes.SwissRollSohl2015 with { HiddenSize = 16, BatchSize = 12, SyntheticSize = 40 },
            _ => Recipes.MnistSmall with { BaseChannels = 8, GroupNormGroups = 4, ChannelMultipliers = [1, 2], AttentionHeads = 1, AttentionHeadSize = 8, Dropout = 0.2, BatchSize = 6, RandomFlip = true, DataPath = "unused" },
        };
        var shape = recipe.SampleShape;
        var data = CounterRng.NormalRows(Enumerable.Range(0, 40).Select(i => (ulong)i).ToArray(), shape, CPU).clamp(-1, 1);
        using var state = TrainingState.Create(recipe, shape, 40, CPU);
        state.Network.train();
        var plan = state.PlanStep();
        var idx = plan.Indices;
        var ep = plan.Epochs;
        Tensor X(long[] ix) => data.index_select(0, tensor(ix));

        state.TrainingStep.Loss(state.Network, X(idx), plan.Step, idx, ep, recipe.BatchSize).backward();
        var whole = Grads(state.Network);
        state.Optimizer.ZeroGrad();
        var cut = idx.Length / 3;
        foreach (var (part, partEpochs) in new[] { (idx[..cut], ep[..cut]), (idx[cut..], ep[cut..]) })
            state.TrainingStep.Loss(state.Network, X(part), plan.Step, part, partEpochs, recipe.BatchSize).backward();
        var parts = Grads(state.Network);
        Assert.Equal(whole.Keys.Order(), parts.Keys.Order());
        foreach (var (name, g) in whole)
            Assert.True(g.allclose(parts[name], rtol: 1e-4, atol: 1e-6), $"{which}: gradient of {name} differs when the batch is split");
    }

    [Fact]
    public void AnIndexRepeatedAcrossEpochsInOneBatchGetsIndependentNoise()
    {
        // 5 samples, batch 12: every index appears more than once, each time from another epoch.
        var order = new DataOrder(5, runSeed: 3);
        var (indices, epochs, _) = order.NextBatch(new DataCursor(0, 0), 12);
        using var schedule = NoiseSchedule.Create(BetaSchedule.Linear, 1000);
        var step = new TrainingStep(new GaussianDiffusion(schedule, PredictionType.Epsilon, VarianceType.FixedLarge), 3, randomFlip: false);
        var draws = step.Draw(0, indices, epochs);
        Assert.Equal(12, draws.NoiseKeys.Distinct().Count());
        Assert.Equal(12, draws.DropoutSeeds.Distinct().Count());
        Assert.Equal(5, indices.Distinct().Count());
    }

    [Fact]
    public void ResumingFromACheckpointReproducesTheUninterruptedRunExactly()
    {
        var dir = Path.Combine(Path.GetTempPath(), "dd-resume-" + Guid.NewGuid());
        try
        {
            var recipe = TinyMlp with { Steps = 12, CheckpointEvery = 0, SampleEvery = 0 };
            using var train = new Dataset(Synthetic2D.SwissRoll(recipe.SyntheticSize, 2), "swiss roll");
            using var straight = TrainingState.Create(recipe, [2], train.Count, CPU);
            using (var t = new LocalTrainer(straight, train, dir + "-a")) t.Run(12);

            using (var first = TrainingState.Create(recipe, [2], train.Count, CPU))
            using (var t = new LocalTrainer(first, train, dir)) t.Run(7);
            var checkpoint = CheckpointStore.Load(dir);
            Assert.Equal(7, checkpoint.Step);
            using var resumed = TrainingState.FromCheckpoint(checkpoint, [2], train.Count, CPU);
            Assert.Equal(straight.Recipe, resumed.Recipe);
            using (var t = new LocalTrainer(resumed, train, dir)) t.Run(12);

            Assert.Equal(straight.Cursor, resumed.Cursor);
            foreach (var ((name, a), (_, b)) in straight.Network.named_parameters().Zip(resumed.Network.named_parameters()))
                Assert.True(a.eq(b).all().item<bool>(), $"parameter {name} differs after resume");
            foreach (var (name, e) in straight.Ema!.Weights)
                Assert.True(e.eq(resumed.Ema!.Weights[name]).all().item<bool>(), $"EMA {name} differs after resume");
        }
        finally
        {
            foreach (var d in new[] { dir, dir + "-a" })
                if (Directory.Exists(d)) Directory.Delete(d, true);
        }
    }

    /// <summary>Checkpoint data made in memory (not through CheckpointStore.Load) is checked too: no NaN weights from a bad update count.</summary>
    [Theory]
    [InlineData("optimizer.step", "-1")]
    [InlineData("optimizer.step", "3")]
    [InlineData("cursor", "64")]
    [InlineData("epoch", "-1")]
    public void RestoringAnOutOfRangePositionIsRefused(string field, string value)
    {
        var recipe = TinyMlp with { Steps = 5, CheckpointEvery = 0, SampleEvery = 0 };
        using var train = new Dataset(Synthetic2D.SwissRoll(recipe.SyntheticSize, 2), "swiss roll");
        using var state = TrainingState.Create(recipe, [2], train.Count, CPU);
        using var trainer = new LocalTrainer(state, train, "unused");
        for (var i = 0; i < 5; i++) trainer.TrainStep();
        var good = state.ToCheckpoint();
        var n = long.Parse(value, System.Globalization.CultureInfo.InvariantCulture);
        var bad = field switch
        {
            "cursor" => good with { Cursor = n },
            "epoch" => good with { Epoch = n },
            _ => good with { Extra = new Dictionary<string, string>(good.Extra) { [field] = value } },
        };
        var e = Assert.Throws<InvalidDataException>(() => TrainingState.FromCheckpoint(bad, [2], train.Count, CPU));
        Assert.Contains("out of range", e.Message, StringComparison.Ordinal);
        using var fine = TrainingState.FromCheckpoint(good, [2], train.Count, CPU);
        Assert.Equal(5, fine.StepsDone);
    }

    [Fact]
    public void ShortSwissRollTrainingBringsSamplesCloseToTheData()
    {
        var recipe = Recipes.SwissRoll with { Steps = 1500, SyntheticSize = 4000, Seed = 11 };
        var (train, heldOut) = DatasetLoader.Load(recipe.ToDataOptions());
        using (train)
        using (heldOut)
        {
            using var state = TrainingState.Create(recipe, [2], train.Count, CPU);
            double Swd()
            {
                using var model = DiffusionModel.FromTrainingState(state);
                using var s = model.Sample(new SamplingRequest(1000, SamplingMethod.Ddpm, 0, 0, 3));
                return SlicedWasserstein.Distance(s.Samples, heldOut.Data.narrow(0, 0, 1000));
            }
            var untrained = Swd();
            using var trainer = new LocalTrainer(state, train, Path.Combine(Path.GetTempPath(), "unused"));
            for (var i = 0; i < recipe.Steps; i++) trainer.TrainStep();
            var trained = Swd();
            Assert.True(trained < 0.25 * untrained, $"sliced Wasserstein distance {trained:F4} after training vs {untrained:F4} untrained");
        }
    }

    [Fact]
    public void SamplesDependOnlyOnSeedAndIndexNotOnBatching()
    {
        using var scope = NewDisposeScope();
        var recipe = TinyMlp;
        using var state = TrainingState.Create(recipe, [2], 64, CPU);
        using var model = DiffusionModel.FromTrainingState(state);
        using var all = model.Sample(new SamplingRequest(10, SamplingMethod.Ddpm, 0, 0, 42), batchSize: 10);
        using var split = model.Sample(new SamplingRequest(10, SamplingMethod.Ddpm, 0, 0, 42), batchSize: 3);
        using var tail = model.Sample(new SamplingRequest(4, SamplingMethod.Ddpm, 0, 0, 42, FirstIndex: 6));
        Assert.True(all.Samples.allclose(split.Samples, atol: 1e-5));
        Assert.True(all.Samples.narrow(0, 6, 4).allclose(tail.Samples, atol: 1e-5));
        using var ddim1 = model.Sample(new SamplingRequest(5, SamplingMethod.Ddim, 20, 0, 1));
        using var ddim2 = model.Sample(new SamplingRequest(5, SamplingMethod.Ddim, 20, 0, 1));
        Assert.True(ddim1.Samples.eq(ddim2.Samples).all().item<bool>());
        using var other = model.Sample(new SamplingRequest(5, SamplingMethod.Ddim, 20, 0, 2));
        Assert.False(ddim1.Samples.allclose(other.Samples));
    }
}
