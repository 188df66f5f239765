using DistDiffusion.Bench;
using DistDiffusion.Protocol;
using DistDiffusion.Tests.Distributed;

namespace DistDiffusion.Tests.Bench;

/// <summary>
/// Long runs are the product: `coordinator run` with two worker processes must not grow with the step count. The
/// distributed path once grew ~10 MB per step on the coordinator and ~6.6 MB on each worker (the OOM killer ended the
/// README's demo at step ~800) while every short test passed. This test trains a few hundred steps with real processes
/// and fails when any process's resident memory grows by more than a bound that the old growth exceeded 100-fold.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class MemoryGrowthTests() : TempFolderTest("dd-soak")
{
    /// <summary>RSS may breathe with the GC's budgets; 450 steps at the old rate would have added ~4.5 GB.</summary>
    private const long BoundBytes = 40L << 20;

    [Theory(Timeout = 300_000)]
    [InlineData(true, TrainerTransport.Socket)]    // tensors through /dev/shm, messages on the worker socket (what `run` uses)
    [InlineData(false, TrainerTransport.Socket)]   // tensors on the worker socket (what remote workers use)
    [InlineData(false, TrainerTransport.Grpc)]     // tensors on the gRPC stream (a worker's --transport grpc, and the fallback)
    public async Task RunWithTwoWorkersKeepsEveryProcessFlat(bool sharedMemory, TrainerTransport transport)
    {
        if (!OperatingSystem.IsLinux()) return;   // /proc
        var result = await SoakMonitor.RunAsync("swissroll", workers: 2, steps: 600, referenceStep: 150, Path.Combine(Dir, "run"), ["seed=5"], CancellationToken.None, sharedMemory, transport);
        Assert.True(result.ExitCode == 0, result.Log);
        Assert.Contains("to step 600", result.Log, StringComparison.Ordinal);
        Assert.Contains(transport == TrainerTransport.Socket ? "(worker socket)" : "(gRPC stream)", result.Log, StringComparison.Ordinal);
        Assert.True(result.EndStep >= 450, $"the last memory sample was taken at step {result.EndStep}");
        Assert.Equal(3, result.Processes.Count);   // the coordinator and both workers were seen at the reference step
        foreach (var p in result.Processes)
            Assert.True(p.Growth <= BoundBytes,
                $"{p.Role} grew {p.Growth / 1048576.0:F1} MB from step {result.ReferenceStep} to {result.EndStep} ({p.AtReference / 1048576.0:F0} -> {p.AtEnd / 1048576.0:F0} MB, bound {BoundBytes >> 20} MB)");
    }
}
