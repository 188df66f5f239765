using DistDiffusion.Coordinator.Training;
using DistDiffusion.Protocol.V1;

namespace DistDiffusion.Tests.Distributed;

/// <summary>The run's status fields without a loop: moving averages, the last checkpoint, and the lock a reply needs.</summary>
public sealed class RunStatusTests
{
    [Fact]
    public void LossAndThroughputAreMovingAveragesStartingAtTheFirstStep()
    {
        var status = new RunStatus(resumedFrom: null);
        status.StepDone(loss: 1.0, gradNorm: 3.0, new StepSplit(0.1, 0.2, 0.3), batchSize: 100, seconds: 1.0);
        status.StepDone(loss: 2.0, gradNorm: 5.0, new StepSplit(0.4, 0.5, 0.6), batchSize: 100, seconds: 0.5);
        var reply = new StatusReply();
        lock (status.Gate) status.FillUnderGate(reply);
        Assert.Equal(0.9 * 1.0 + 0.1 * 2.0, reply.Loss, 12);
        Assert.Equal(0.9 * 100 + 0.1 * 200, reply.SamplesPerSecond, 9);
        var telemetry = status.ReadTelemetry();
        Assert.Equal(5.0, telemetry.GradNorm);
        Assert.Equal(new StepSplit(0.4, 0.5, 0.6), telemetry.LastStep);
        Assert.Null(telemetry.CheckpointAgeSeconds);
        Assert.Equal(RunState.WaitingForWorkers, reply.State);
    }

    [Fact]
    public void ACheckpointResumedFromIsTheLastOneUntilANewOneIsSaved()
    {
        var status = new RunStatus(("runs/x/checkpoints/200", 200));
        Assert.Equal(("runs/x/checkpoints/200", 200L), status.LastCheckpoint);
        Assert.Equal("runs/x/checkpoints/200 (step 200)", status.DescribeLastCheckpoint());
        Assert.Null(status.ReadTelemetry().CheckpointAgeSeconds);   // resumed: its age is not known

        status.CheckpointSaved("runs/x/checkpoints/300", 300);
        status.SetState(RunState.Training);
        var reply = new StatusReply();
        lock (status.Gate) status.FillUnderGate(reply);
        Assert.Equal("runs/x/checkpoints/300", reply.LastCheckpoint);
        Assert.Equal(300UL, reply.LastCheckpointStep);
        Assert.Equal(RunState.Training, reply.State);
        Assert.True(status.ReadTelemetry().CheckpointAgeSeconds is >= 0 and < 60);

        var fresh = new RunStatus(resumedFrom: null);
        Assert.Equal("none", fresh.DescribeLastCheckpoint());
        var empty = new StatusReply();
        lock (fresh.Gate) fresh.FillUnderGate(empty);
        Assert.Equal(0UL, empty.LastCheckpointStep);
        Assert.Equal("", empty.LastCheckpoint);
    }

    [Fact]
    public void AReplyFilledWithoutTheGateIsRefused()
    {
        var status = new RunStatus(resumedFrom: null);
        var e = Assert.Throws<InvalidOperationException>(() => status.FillUnderGate(new StatusReply()));
        Assert.Contains("Gate", e.Message, StringComparison.Ordinal);
    }
}
