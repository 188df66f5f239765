using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Protocol.V1;

namespace DistDiffusion.Tests.Distributed;

/// <summary>
/// The coordinator's loop when the disk refuses a checkpoint: logged, training goes on, the next interval tries again,
/// and the status shows only checkpoints that were written. A regular file where the run's checkpoints/ folder must
/// go makes every save fail with an IOException (no root-only tricks); deleting it is the disk coming back.
/// A hand-driven worker paces the steps, so the test knows which checkpoint attempts have happened.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class CoordinatorCheckpointTests() : TempFolderTest("dd-coord-ckpt")
{
    private string ObstructedRun()
    {
        var runDir = Path.Combine(Dir, "run");
        Directory.CreateDirectory(runDir);
        File.WriteAllText(Path.Combine(runDir, CheckpointStore.CheckpointsFolderName), "a file where the checkpoints folder should be");
        return runDir;
    }

    private static async Task<StepAssignment> CompleteAsync(RawWorker w, StepAssignment a)
    {
        await w.SendAllAsync(w.Push(a, new float[w.Elements]));
        return await w.NextAssignmentAsync();
    }

    [Fact(Timeout = 90_000)]
    public async Task AFailedCheckpointIsLoggedTrainingGoesOnAndTheStatusStaysTruthful()
    {
        var runDir = ObstructedRun();
        await using var server = await Cluster.Start(Cluster.Options(runDir, steps: 6, checkpointEvery: 2));
        await using var w = await RawWorker.JoinAsync(server.Address);
        var a = await w.NextAssignmentAsync();
        a = await CompleteAsync(w, a);
        a = await CompleteAsync(w, a);
        // Step 2 is done and its checkpoint failed; the loop has gone on to assign step 2.
        Assert.Equal(2ul, a.Step);
        var status = server.Loop.Status();
        Assert.Equal(2ul, status.Step);
        Assert.Equal("", status.LastCheckpoint);
        Assert.Equal(0ul, status.LastCheckpointStep);

        File.Delete(Path.Combine(runDir, CheckpointStore.CheckpointsFolderName));
        a = await CompleteAsync(w, a);
        a = await CompleteAsync(w, a);
        Assert.Equal(4ul, a.Step);
        status = server.Loop.Status();
        Assert.Equal(Path.Combine(runDir, "checkpoints", "4"), status.LastCheckpoint);
        Assert.Equal(4ul, status.LastCheckpointStep);

        a = await CompleteAsync(w, a);
        await w.SendAllAsync(w.Push(a, new float[w.Elements]));
        await server.Loop.Completion.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.Equal([4L, 6L], CheckpointStore.List(runDir).Select(c => c.Step));
        Assert.Equal(6ul, server.Loop.Status().LastCheckpointStep);
    }

    [Fact(Timeout = 90_000)]
    public async Task AFinalCheckpointThatCannotBeWrittenFailsTheRunAfterRetries()
    {
        var runDir = ObstructedRun();
        await using var server = await Cluster.Start(Cluster.Options(runDir, steps: 2));
        await using var w = await RawWorker.JoinAsync(server.Address);
        var a = await w.NextAssignmentAsync();
        a = await CompleteAsync(w, a);
        await w.SendAllAsync(w.Push(a, new float[w.Elements]));
        var e = await Assert.ThrowsAsync<IOException>(() => server.Loop.Completion.WaitAsync(TimeSpan.FromSeconds(30)));
        Assert.Contains("the final checkpoint of step 2 could not be written in 3 attempts", e.Message, StringComparison.Ordinal);
        Assert.Equal(0ul, server.Loop.Status().LastCheckpointStep);
        Assert.Equal("", server.Loop.Status().LastCheckpoint);
    }
}
