using System.Runtime.InteropServices;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Training;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Training;

/// <summary>
/// The bitwise guarantee rests on this: a batch's gradient has the same bits whatever number of CPU threads the process
/// computes it with (a worker with 1 thread and `train` with 2 must agree). libtorch's own kernels do not give that for
/// the U-Net (convolution and group-norm reductions split by thread count: about 11% of gradient bytes differ between 1
/// and 2 intra-op threads on this CPU); <see cref="MicroBatchGradients"/> pins one intra-op thread per micro-batch and
/// spends extra threads on micro-batches in parallel instead.
/// </summary>
public sealed class ThreadInvarianceTests
{
    public static TheoryData<string> Networks => ["swissroll", "mnist-small"];

    [Theory]
    [MemberData(nameof(Networks))]
    public void ABatchGradientHasTheSameBitsOnOneAndTwoThreads(string which)
    {
        var recipe = which == "swissroll"
            ? Recipes.SwissRoll with { SyntheticSize = 64, BatchSize = 64 }
            : Recipes.MnistSmall with { DataPath = "unused", BatchSize = 16, MicroBatches = 4 };
        var shape = recipe.SampleShape;
        using var scope = NewDisposeScope();
        using var data = new Dataset(CounterRng.NormalRows(Enumerable.Range(0, 64).Select(i => (ulong)i).ToArray(), shape, CPU).clamp(-1, 1), "noise");
        using var state = TrainingState.Create(recipe, shape, data.Count, CPU);
        state.Network.train();
        var plan = state.PlanStep();
        var keys = state.TrainingStep.SampleKeys(plan.Step, plan.Indices, plan.Epochs);
        var bits = new List<byte[]>();
        var previous = get_num_threads();
        try
        {
            foreach (var threads in new[] { 1, 2, 1 })
            {
                set_num_threads(threads);
                using var gradients = new MicroBatchGradients(recipe, state.Network, state.TrainingStep, CPU, threads);
                Assert.Equal(threads, gradients.Replicas);
                var values = new float[gradients.Elements];
                gradients.Compute(gradients.Tree.Root, data, plan.Indices, keys, plan.Step, values);
                bits.Add(MemoryMarshal.AsBytes(values.AsSpan()).ToArray());
            }
        }
        finally
        {
            set_num_threads(previous);
        }
        Assert.Equal(bits[0], bits[2]);
        var differing = bits[0].Zip(bits[1]).Count(p => p.First != p.Second);
        Assert.True(differing == 0, $"{which}: {differing} of {bits[0].Length} gradient bytes differ between 1 and 2 threads");
        Assert.Contains(bits[0], b => b != 0);
    }
}
