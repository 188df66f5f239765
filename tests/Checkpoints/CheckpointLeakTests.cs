using DistDiffusion.Model.Checkpoints;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Checkpoints;

/// <summary>TorchSharp counts live tensors process-wide: tests that read the count must not run alongside others.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class TensorAccountingCollection
{
    public const string Name = "Checkpoints.TensorAccounting";
}

[Collection(TensorAccountingCollection.Name)]
public sealed class CheckpointLeakTests : IDisposable
{
    private readonly TempFolder _run = new("distdiffusion-ckpt");

    public void Dispose() => _run.Dispose();

    /// <summary>Live tensors after finalizing earlier garbage (call before the code under test only: a collection
    /// afterwards would finalize leaked tensors and hide the leak).</summary>
    private static long Baseline()
    {
        GC.Collect();
        GC.WaitForPendingFinalizers();
        return Tensor.TotalCount;
    }

    [Fact]
    public void FailedLoadHandsOutNoTensors()
    {
        string folder;
        using (var store = new CheckpointStoreTests())
        {
            // Reuse the sample checkpoint of the store tests; its own tensors are released when it is disposed.
            folder = CheckpointStore.Save(_run.Path, store.Sample(3));
        }
        CheckpointStoreTests.BreakOptimizerFileBehindTheChecksum(folder);

        var before = Baseline();
        for (var i = 0; i < 3; i++)
            Assert.Throws<CheckpointException>(() => CheckpointStore.Load(_run.Path));
        Assert.Equal(before, Tensor.TotalCount);
    }

    [Fact]
    public void SuccessfulLoadHandsOutExactlyTheCheckpointTensors()
    {
        string folder;
        using (var store = new CheckpointStoreTests())
            folder = CheckpointStore.Save(_run.Path, store.Sample(3));

        // Guards the test above: the counter does move when tensors are loaded and released.
        var before = Baseline();
        var loaded = CheckpointStore.Load(folder);
        var handedOut = loaded.Model.Count + loaded.Ema.Count + loaded.Optimizer.Count;
        Assert.Equal(7, handedOut);
        Assert.Equal(before + handedOut, Tensor.TotalCount);
        foreach (var t in loaded.Model.Values.Concat(loaded.Ema.Values).Concat(loaded.Optimizer.Values))
            t.Dispose();
        Assert.Equal(before, Tensor.TotalCount);
    }
}
