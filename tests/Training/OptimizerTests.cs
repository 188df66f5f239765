using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Optimization;
using DistDiffusion.Model.Sampling;
using DistDiffusion.Model.Training;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Training;

public class OptimizerTests
{
    [Fact]
    public void AdamMatchesTorchAdamStepForStep()
    {
        using var scope = NewDisposeScope();
        var recipe = new Recipe { LearningRate = 0.01, AdamBeta1 = 0.9, AdamBeta2 = 0.99, AdamEpsilon = 1e-8 };
        var a = nn.Linear(3, 2);
        var b = nn.Linear(3, 2);
        b.load_state_dict(a.state_dict());
        using var ours = new AdamOptimizer(a.named_parameters().Select(p => (p.name, p.parameter)), recipe.ToAdamOptions());
        var theirs = optim.Adam(b.parameters(), lr: 0.01, beta1: 0.9, beta2: 0.99, eps: 1e-8);
        var x = tensor(new float[] { 1, 2, 3, -1, 0.5f, 2 }, new long[] { 2, 3 });
        for (var step = 0; step < 5; step++)
        {
            ours.ZeroGrad();
            theirs.zero_grad();
            a.forward(x * (step + 1)).square().sum().backward();
            b.forward(x * (step + 1)).square().sum().backward();
            ours.Step();
            theirs.step();
        }
        foreach (var ((_, pa), (_, pb)) in a.named_parameters().Zip(b.named_parameters()))
            Assert.True(pa.allclose(pb, rtol: 1e-5, atol: 1e-6));
        Assert.Equal(5, ours.StepCount);
    }

    /// <summary>Adam with a clipped norm and AdamW decay: every branch of the element loop.</summary>
    private static Recipe ClippedAdamW => new() { LearningRate = 0.02, AdamBeta1 = 0.9, AdamBeta2 = 0.999, AdamEpsilon = 1e-8, WeightDecay = 0.1, GradClip = 0.5 };

    /// <summary>Two 37 x 13 layers (whole vectors and a tail) with the same weights, drawn from <paramref name="seed"/>.</summary>
    private static (TorchSharp.Modules.Linear A, TorchSharp.Modules.Linear B) TwinLinears(int seed)
    {
        manual_seed(seed);
        var a = nn.Linear(37, 13);
        var b = nn.Linear(37, 13);
        b.load_state_dict(a.state_dict());
        return (a, b);
    }

    [Fact]
    public void ElementLoopMatchesTheTensorOpsWithClippingAndWeightDecay()
    {
        // 37 x 13 weights: whole vectors and a tail, on CPU where the element loop applies; a clipped norm and AdamW decay.
        using var scope = NewDisposeScope();
        var recipe = ClippedAdamW;
        var (a, b) = TwinLinears(7);
        var start = a.weight!.clone();
        using var loop = new AdamOptimizer(a.named_parameters().Select(p => (p.name, p.parameter)), recipe.ToAdamOptions());
        using var ops = new AdamOptimizer(b.named_parameters().Select(p => (p.name, p.parameter)), recipe.ToAdamOptions()) { UseTensorOps = true };
        var x = randn(16, 37);
        for (var step = 0; step < 6; step++)
        {
            loop.ZeroGrad();
            ops.ZeroGrad();
            a.forward(x * (step + 1)).square().sum().backward();
            b.forward(x * (step + 1)).square().sum().backward();
            var norm = loop.Step();
            Assert.True(norm > recipe.GradClip);   // the clipping scale is in play
            var theirs = ops.Step();
            Assert.True(Math.Abs(norm - theirs) <= 1e-6 * norm, $"step {step}: norm {norm} vs {theirs}");
        }
        foreach (var ((_, pa), (_, pb)) in a.named_parameters().Zip(b.named_parameters()))
            Assert.True(pa.allclose(pb, rtol: 1e-5, atol: 1e-7), $"largest difference {(pa - pb).abs().max().item<float>()}");
        foreach (var ((_, ma), (_, mb)) in loop.StateTensors().OrderBy(kv => kv.Key).Zip(ops.StateTensors().OrderBy(kv => kv.Key)))
            Assert.True(ma.allclose(mb, rtol: 1e-5, atol: 1e-7), $"largest difference {(ma - mb).abs().max().item<float>()} of {ma.abs().max().item<float>()}");
        Assert.True((a.weight! - start).abs().max().item<float>() > 1e-3f);   // the weights moved
    }

    [Fact]
    public void FlatStepIsTheGradStepBitForBitAndWritesTheNewParameters()
    {
        // The coordinator's path (a flat summed gradient and a presence bitmap, no .grad) against `train`'s (.grad): a
        // clipped norm, AdamW decay, and a layer that has no gradient at first (skipped), then one, then none again
        // (its zeroed .grad keeps it in the update with a zero gradient: so must the flat path).
        using var scope = NewDisposeScope();
        var recipe = new Recipe { LearningRate = 0.02, AdamBeta1 = 0.9, AdamBeta2 = 0.999, AdamEpsilon = 1e-8, WeightDecay = 0.1, GradClip = 0.5 };
        manual_seed(11);
        var a = nn.Sequential(("first", nn.Linear(37, 13)), ("second", nn.Linear(13, 5)), ("third", nn.Linear(5, 3)));
        var b = nn.Sequential(("first", nn.Linear(37, 13)), ("second", nn.Linear(13, 5)), ("third", nn.Linear(5, 3)));
        b.load_state_dict(a.state_dict());
        using var viaGrad = new AdamOptimizer(a.named_parameters().Select(p => (p.name, p.parameter)), recipe.ToAdamOptions());
        using var flat = new AdamOptimizer(b.named_parameters().Select(p => (p.name, p.parameter)), recipe.ToAdamOptions());
        Assert.True(flat.CanStepFlat);
        var gradients = ParameterVector.Of(a);
        var parameters = ParameterVector.Of(b);
        var x = randn(16, 37);
        var updated = new float[parameters.Elements];
        var thirdStart = b.named_parameters().Last().parameter.clone();
        foreach (var (step, third) in new[] { (0, false), (1, true), (2, false), (3, false) })
        {
            viaGrad.ZeroGrad();
            var hidden = a.named_children().Select(c => c.module).Cast<nn.Module<Tensor, Tensor>>().ToList();
            var h = hidden[1].forward(hidden[0].forward(x * (step + 1)));
            (third ? hidden[2].forward(h) : h).square().sum().backward();
            var (values, _) = gradients.ReadGradients();
            var present = new byte[1];
            for (var i = 0; i < (third ? 6 : 4); i++) present[0] |= (byte)(1 << i);
            var sum = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(values).ToArray();
            var expected = viaGrad.Step();
            var norm = flat.Step(sum, present, updated);
            Assert.Equal(expected, norm);
            Assert.True(norm > recipe.GradClip, $"step {step}: the clipping scale is in play");
            foreach (var ((name, pa), (_, pb)) in a.named_parameters().Zip(b.named_parameters()))
                Assert.True(pa.eq(pb).all().item<bool>(), $"step {step}, {name}: largest difference {(pa - pb).abs().max().item<float>()}");
            foreach (var ((name, ma), (_, mb)) in viaGrad.StateTensors().OrderBy(kv => kv.Key).Zip(flat.StateTensors().OrderBy(kv => kv.Key)))
                Assert.True(ma.eq(mb).all().item<bool>(), $"step {step}, {name}");
            Assert.Equal(parameters.ReadValues(), System.Runtime.InteropServices.MemoryMarshal.AsBytes(updated.AsSpan()).ToArray());
        }
        Assert.False(thirdStart.eq(b.named_parameters().Last().parameter).all().item<bool>(), "the third layer took part");

        // A non-finite gradient is refused before anything changes: parameters, moments, step count, the output.
        var before = parameters.ReadValues();
        var nan = new float[parameters.Elements];
        nan[3] = float.NaN;
        Array.Fill(updated, 42f);
        Assert.Throws<NonFiniteGradientException>(() => flat.Step(nan, [0x3f], updated));
        Assert.Equal(before, parameters.ReadValues());
        Assert.Equal(4, flat.StepCount);
        Assert.All(updated, v => Assert.Equal(42f, v));
        Assert.Throws<ArgumentException>(() => flat.Step(new float[3], [0x3f], updated));
    }

    [Fact]
    public void CosineDecayRunsFromTheRateAfterWarmupToTheMinimumAtTheLastStep()
    {
        using var scope = NewDisposeScope();
        var lin = nn.Linear(2, 1, hasBias: false);
        var recipe = new Recipe { LearningRate = 0.1, WarmupSteps = 10, Steps = 110, LearningRateDecay = LearningRateDecay.Cosine, MinLearningRate = 0.01 };
        using var opt = new AdamOptimizer(lin.named_parameters().Select(p => (p.name, p.parameter)), recipe.ToAdamOptions());
        Assert.Equal(0.05, opt.LearningRateAt(5), 12);                       // warm-up: 0.1 x 5/10
        Assert.Equal(0.1, opt.LearningRateAt(10), 12);                       // p = 0
        Assert.Equal(0.01 + 0.09 * 0.5 * (1 + Math.Cos(Math.PI / 4)), opt.LearningRateAt(35), 12);   // p = 1/4
        Assert.Equal(0.055, opt.LearningRateAt(60), 12);                     // p = 1/2: half-way between 0.1 and 0.01
        Assert.Equal(0.01, opt.LearningRateAt(110), 12);                     // the last step
        Assert.Equal(0.01, opt.LearningRateAt(500), 12);                     // past the end (a run extended with --steps beyond its recipe)
        for (var step = 11; step <= 110; step++)
            Assert.True(opt.LearningRateAt(step) < opt.LearningRateAt(step - 1), $"step {step}: the rate must fall");
    }

    [Fact]
    public void ClippingWarmupAndNonFiniteGradients()
    {
        using var scope = NewDisposeScope();
        var lin = nn.Linear(2, 1, hasBias: false);
        var recipe = new Recipe { LearningRate = 0.1, GradClip = 1.0, WarmupSteps = 10 };
        using var opt = new AdamOptimizer(lin.named_parameters().Select(p => (p.name, p.parameter)), recipe.ToAdamOptions());
        Assert.Equal(0.01, opt.LearningRateAt(1), 12);
        Assert.Equal(0.1, opt.LearningRateAt(10), 12);
        Assert.Equal(0.1, opt.LearningRateAt(50), 12);
        (lin.forward(tensor(new float[] { 100, 100 }, new long[] { 1, 2 })).sum()).backward();
        Assert.True(opt.GradientNorm() > 100);
        var before = lin.weight!.clone();
        opt.Step();
        Assert.False(lin.weight!.eq(before).all().item<bool>());
        // A NaN gradient is refused and leaves the weights untouched.
        opt.ZeroGrad();
        lin.weight!.grad!.fill_(float.NaN);
        var kept = lin.weight!.clone();
        Assert.Throws<NonFiniteGradientException>(() => opt.Step());
        Assert.True(lin.weight!.eq(kept).all().item<bool>());
        Assert.Equal(1, opt.StepCount);
    }

    [Fact]
    public void EmaElementLoopMatchesTheTensorOpsAndTheFlatStepsFusedUpdateIsItBitForBit()
    {
        // 37 x 13 weights (whole vectors and a tail) on CPU. Three EMAs of the same training: by libtorch's ops, by the element
        // loop after each .grad step (`train`), and fused into the optimizer's flat step (the coordinator's): the last two
        // must agree in every bit, the first to float32 rounding.
        using var scope = NewDisposeScope();
        var recipe = ClippedAdamW;
        var (a, b) = TwinLinears(9);
        var namedA = a.named_parameters().Select(p => (p.name, p.parameter)).ToList();
        var namedB = b.named_parameters().Select(p => (p.name, p.parameter)).ToList();
        using var gradStep = new AdamOptimizer(namedA, recipe.ToAdamOptions());
        using var flatStep = new AdamOptimizer(namedB, recipe.ToAdamOptions());
        using var ops = new ExponentialMovingAverage(namedA, 0.9) { UseTensorOps = true };
        using var loop = new ExponentialMovingAverage(namedA, 0.9);
        using var fused = new ExponentialMovingAverage(namedB, 0.9);
        Assert.True(loop.CanUpdateInPlace);
        Assert.False(ops.CanUpdateInPlace);
        var vector = new ParameterVector(namedB.Select(p => (p.name, (Tensor)p.parameter)));
        var x = randn(16, 37);
        for (var step = 1; step <= 6; step++)
        {
            gradStep.ZeroGrad();
            a.forward(x * step).square().sum().backward();
            gradStep.Step();
            ops.Update(step);
            loop.Update(step);
            b.zero_grad();
            b.forward(x * step).square().sum().backward();
            var (gradient, present) = vector.ReadGradients();
            var updated = new float[vector.Elements];
            var factors = fused.FactorsAt(step);
            flatStep.Step(System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(gradient.AsSpan()), present, updated, (name, values) => fused.UpdateParameter(name, values, factors));
        }
        foreach (var (name, _) in namedA)
        {
            Assert.True(loop.Weights[name].eq(fused.Weights[name]).all().item<bool>(), $"{name}: the fused EMA differs from the element loop's");
            Assert.True(loop.Weights[name].allclose(ops.Weights[name], rtol: 1e-6, atol: 1e-7), $"{name}: largest difference {(loop.Weights[name] - ops.Weights[name]).abs().max().item<float>()}");
            Assert.False(loop.Weights[name].eq(a.named_parameters().First(p => p.name == name).parameter).all().item<bool>());   // it lags the weights
        }
    }

    [Fact]
    public void EmaWarmsUpThenFollowsDecay()
    {
        using var scope = NewDisposeScope();
        var lin = nn.Linear(1, 1, hasBias: false);
        using (no_grad()) lin.weight!.fill_(0f);
        using var ema = new ExponentialMovingAverage(lin.named_parameters().Select(p => (p.name, p.parameter)), 0.99);
        Assert.Equal(2.0 / 11.0, ema.DecayAt(1), 12);
        Assert.Equal(0.99, ema.DecayAt(100_000), 12);
        using (no_grad()) lin.weight!.fill_(1f);
        ema.Update(1);
        Assert.Equal(1 - 2.0 / 11.0, ema.Weights["weight"].item<float>(), 5);
    }
}

/// <summary>
/// Torch work while another thread allocates, as in the coordinator and workers (whose gRPC threads allocate all the
/// time): TorchSharp's temporary Scalars must not be finalized while libtorch reads them (see TorchRuntime.Compute).
/// </summary>
[Collection(DistDiffusion.Tests.Checkpoints.TensorAccountingCollection.Name)]
public sealed class OptimizerUnderGcPressureTests
{
    [Fact]
    public void AdamAndEmaStepsSurviveAnotherThreadsAllocations()
    {
        using var scope = TorchSharp.torch.NewDisposeScope();
        var w = TorchSharp.torch.nn.Parameter(TorchSharp.torch.randn(64, 64));
        var b = TorchSharp.torch.nn.Parameter(TorchSharp.torch.randn(64));
        var named = new List<(string, TorchSharp.Modules.Parameter)> { ("w", w), ("b", b) };
        var recipe = Recipes.Get("swissroll") with { GradClip = 1.0, WeightDecay = 0.01 };
        using var adam = new AdamOptimizer(named, recipe.ToAdamOptions());
        using var ema = new ExponentialMovingAverage(named, 0.99);
        using var stop = new CancellationTokenSource();
        var gen0 = GC.CollectionCount(0);
        var collector = new Thread(() => Allocate(stop.Token));
        collector.Start();
        try
        {
            for (var i = 0; i < 3000; i++)
            {
                // As the coordinator's training loop does it.
                using var guard = DistDiffusion.Model.TorchRuntime.Compute();
                using var s = TorchSharp.torch.NewDisposeScope();
                (w.sum() + b.sum()).backward();
                adam.Step();
                ema.Update(i + 1);
                adam.ZeroGrad();
            }
        }
        finally
        {
            stop.Cancel();
            collector.Join();
        }
        Assert.True(GC.CollectionCount(0) > gen0 + 10, "the allocating thread should have caused collections");
        Assert.True(TorchSharp.torch.isfinite(w).all().item<bool>());
    }

    /// <summary>
    /// What workers run — training steps of the MLP and a U-Net, and sampling — while another thread allocates as gRPC
    /// threads do (here far faster), so collections keep happening: <see cref="DistDiffusion.Model.TorchRuntime.Compute"/>
    /// keeps them out of torch calls.
    /// </summary>
    [Theory]
    [InlineData("swissroll")]
    [InlineData("unet")]
    public void WorkerStepsAndSamplingSurviveAnotherThreadsAllocations(string which)
    {
        var recipe = which == "unet"
            ? Recipes.Get("mnist-small") with { BaseChannels = 8, GroupNormGroups = 4, ChannelMultipliers = [1, 2], AttentionHeads = 1, AttentionHeadSize = 8, Dropout = 0.1, BatchSize = 4, RandomFlip = true }
            : Recipes.Get("swissroll") with { HiddenSize = 64, BatchSize = 64, SyntheticSize = 256 };
        using var worker = DistDiffusion.Worker.WorkerModel.Load(recipe.ToJson(), TorchSharp.torch.CPU);
        var n = recipe.BatchSize;
        using var data = new DistDiffusion.Model.Data.Dataset(TorchSharp.torch.rand([n, .. recipe.SampleShape]) * 2 - 1, "noise");
        var indices = Enumerable.Range(0, n).Select(i => (long)i).ToArray();
        using var model = DiffusionModel.FromWeights(recipe,
            worker.Network.named_parameters().ToDictionary(p => p.name, p => (TorchSharp.torch.Tensor)p.parameter), TorchSharp.torch.CPU);
        var gradient = new byte[worker.Vector.Elements * 4];
        var gen0 = GC.CollectionCount(0);
        using var stop = new CancellationTokenSource();
        var allocator = new Thread(() => Allocate(stop.Token));
        allocator.Start();
        try
        {
            for (var step = 0; step < (which == "unet" ? 60 : 400); step++)
            {
                var seeds = indices.Select(i => (ulong)(step * 1000 + i)).ToArray();
                worker.Gradient(data, MicroBatchTree.For(recipe).Root, indices, seeds, gradient);
            }
            using var result = model.Sample(new SamplingRequest(8, SamplingMethod.Ddpm, 0, 0, 1));
            Assert.True(TorchSharp.torch.isfinite(result.Samples).all().item<bool>());
        }
        finally
        {
            stop.Cancel();
            allocator.Join();
        }
        Assert.True(GC.CollectionCount(0) > gen0 + 10, "the allocating thread should have caused collections");
    }

    /// <summary>
    /// Garbage, small and large objects, as gRPC threads make it, plus a forced gen-0 collection every few hundred
    /// allocations, so collections (and with them finalizers of unreachable temporaries) land inside torch calls often.
    /// </summary>
    private static void Allocate(CancellationToken stop)
    {
        var keep = new object[64];
        for (var i = 0; !stop.IsCancellationRequested; i++)
        {
            keep[i % keep.Length] = new byte[i % 7 == 0 ? 90_000 : 2_000];
            if (i % 256 == 0) GC.Collect(0, GCCollectionMode.Forced, blocking: true);
            if (i % 64 == 0) Thread.Sleep(0);
        }
    }
}
