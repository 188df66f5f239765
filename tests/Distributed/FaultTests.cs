using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Protocol.V1;
using Grpc.Core;

namespace DistDiffusion.Tests.Distributed;

/// <summary>
/// A worker holding the token that pushes absurd gradients is dropped and its slice recomputed, so the run ends where it
/// would have without it; gradients that several workers agree are non-finite stop the run with a checkpoint of the last
/// completed step. Real coordinator (in this process, real sockets), real worker processes and hand-driven workers.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class FaultTests() : TempFolderTest("dd-faults")
{
    private static string Logs(IEnumerable<KeptOutputProcess> ps) => string.Join("\n---\n", ps.Select(p => p.Output));

    [Theory(Timeout = 180_000)]
    [InlineData(1e20f)]   // squares overflow float32: the old coordinator died in Adam with no checkpoint
    [InlineData(1e15f)]   // squares still finite: the old coordinator applied it and poisoned Adam's second moment
    public async Task AWorkerPushingHugeGradientsIsDroppedAndTheRunMatchesOneProcess(float value)
    {
        const int steps = 20;
        var reference = Cluster.LocalReference(Cluster.Recipe(steps), Path.Combine(Dir, "local"));
        var runDir = Path.Combine(Dir, "dist");
        await using var server = await Cluster.Start(Cluster.Options(runDir, steps, minWorkers: 2));
        await using var hostile = await RawWorker.JoinAsync(server.Address);
        using var worker = new WorkerProcess(server.Address, Cluster.Token);
        try
        {
            var a = await hostile.NextAssignmentAsync();
            var huge = Enumerable.Repeat(value, (int)hostile.Elements).ToArray();
            try
            {
                await hostile.SendAllAsync(hostile.Push(a, huge));
            }
            catch (RpcException)
            {
                // the coordinator may end the call while we still write; its status is read below
            }
            var error = await hostile.FailureAsync();
            Assert.Equal(StatusCode.InvalidArgument, error.StatusCode);
            Assert.Contains("refused", error.Status.Detail);
            Assert.Contains("recomputed on another worker", error.Status.Detail);
            await server.Loop.Completion.WaitAsync(TimeSpan.FromSeconds(150));
            var status = server.Loop.Status();
            Assert.Equal(RunState.Complete, status.State);
            Assert.Contains(status.Workers, w => w.State == WorkerState.Dropped);
            Cluster.AssertSameState(reference, Cluster.Latest(runDir), worker.Output);
            Cluster.AssertIdenticalFiles(Path.Combine(Dir, "local"), runDir);
        }
        finally
        {
            reference.DisposeTensors();
        }
    }

    [Fact(Timeout = 120_000)]
    public async Task TwoWorkersAgreeingOnANonFiniteGradientStopTheRunWithACheckpointOfTheLastStep()
    {
        var runDir = Path.Combine(Dir, "run");
        await using var server = await Cluster.Start(Cluster.Options(runDir, steps: 50));
        await using var first = await RawWorker.JoinAsync(server.Address);
        // Three good steps (zero gradients are valid: Adam moves nothing).
        for (var step = 0; step < 3; step++)
        {
            var a = await first.NextAssignmentAsync();
            Assert.Equal((ulong)step, a.Step);
            await first.SendAllAsync(first.Push(a, new float[first.Elements]));
        }
        var bad = await first.NextAssignmentAsync();
        Assert.Equal(3ul, bad.Step);
        var nan = Enumerable.Repeat(float.NaN, (int)first.Elements).ToArray();
        await first.SendAllAsync(first.Push(bad, nan));
        var error = await first.FailureAsync();
        Assert.Equal(StatusCode.InvalidArgument, error.StatusCode);
        Assert.Contains("non-finite", error.Status.Detail);
        Assert.Equal(RunState.WaitingForWorkers, server.Loop.Status().State);

        // A second, independent worker gets the same slice and agrees: that is divergence, not a bad worker.
        await using var second = await RawWorker.JoinAsync(server.Address);
        var again = await second.NextAssignmentAsync();
        Assert.Equal((bad.Step, bad.Slice), (again.Step, again.Slice));
        await second.SendAllAsync(second.Push(again, nan));
        var stopped = await Assert.ThrowsAnyAsync<Exception>(() => server.Loop.Completion.WaitAsync(TimeSpan.FromSeconds(30)));
        Assert.Contains("diverged at step 3", stopped.Message);
        var status = server.Loop.Status();
        Assert.Equal(RunState.Failed, status.State);
        Assert.Equal(3ul, status.Step);
        Assert.Equal(3ul, status.LastCheckpointStep);
        using var checkpoint = new DisposableCheckpoint(Cluster.Latest(runDir));
        Assert.Equal(3, checkpoint.Data.Step);
        Assert.All(checkpoint.Data.Model.Values, t => Assert.True(t.isfinite().all().item<bool>()));
    }

    private sealed class DisposableCheckpoint(Model.Checkpoints.CheckpointData data) : IDisposable
    {
        public Model.Checkpoints.CheckpointData Data { get; } = data;
        public void Dispose() => Data.DisposeTensors();
    }
}
