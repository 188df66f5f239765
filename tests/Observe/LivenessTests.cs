using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Monitoring;
using DistDiffusion.Coordinator.Observe;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using DistDiffusion.Tests.Distributed;
using Grpc.Health.V1;

namespace DistDiffusion.Tests.Observe;

/// <summary>Issue 30: the liveness watch with a hand-moved clock, and health service distdiffusion.liveness of a real coordinator.</summary>
public sealed class LivenessWatchTests
{
    private sealed class ManualClock : TimeProvider
    {
        private DateTimeOffset _now = new(2026, 1, 1, 0, 0, 0, TimeSpan.Zero);
        public override DateTimeOffset GetUtcNow() => _now;
        public void Advance(double seconds) => _now += TimeSpan.FromSeconds(seconds);
    }

    private static LoopReading Training(long step, int workers = 2, long sampled = 0) => new(RunState.Training, workers, step, sampled);

    [Fact]
    public void TrainingWithoutProgressFailsAfterTheTimeoutAndAStepRevivesIt()
    {
        var clock = new ManualClock();
        var watch = new LivenessWatch(TimeSpan.FromSeconds(60), sampleOnly: false, clock);
        Assert.True(watch.Verdict().Alive);
        watch.Observe(Training(10));
        clock.Advance(59);
        watch.Observe(Training(10));
        Assert.True(watch.Verdict().Alive, watch.Verdict().Reason);
        clock.Advance(2);
        watch.Observe(Training(10));
        var verdict = watch.Verdict();
        Assert.False(verdict.Alive);
        Assert.Contains("no training progress for 61 s at step 10 with 2 workers live", verdict.Reason, StringComparison.Ordinal);
        // One step later: alive, and the next 60 s count from that step.
        watch.Observe(Training(11));
        Assert.True(watch.Verdict().Alive);
        clock.Advance(60);
        Assert.True(watch.Verdict().Alive);
        clock.Advance(1);
        Assert.False(watch.Verdict().Alive);
    }

    [Fact]
    public void ReadingsThatStopLeaveTheLastOneStanding()
    {
        var clock = new ManualClock();
        var watch = new LivenessWatch(TimeSpan.FromSeconds(30), sampleOnly: false, clock);
        watch.Observe(Training(3));
        clock.Advance(31);
        Assert.False(watch.Verdict().Alive);

        var idle = new LivenessWatch(TimeSpan.FromSeconds(30), sampleOnly: false, clock);
        idle.Observe(new LoopReading(RunState.WaitingForWorkers, 1, 3, 0));
        clock.Advance(3_600);
        Assert.True(idle.Verdict().Alive, idle.Verdict().Reason);
    }

    [Fact]
    public void SamplingProgressCountsAsProgress()
    {
        var clock = new ManualClock();
        var watch = new LivenessWatch(TimeSpan.FromSeconds(30), sampleOnly: false, clock);
        watch.Observe(Training(100, sampled: 0));
        for (var batch = 1; batch <= 10; batch++)
        {
            clock.Advance(20);
            watch.Observe(Training(100, sampled: batch));
            Assert.True(watch.Verdict().Alive, watch.Verdict().Reason);
        }
        clock.Advance(31);
        Assert.False(watch.Verdict().Alive);
    }

    [Theory]
    [InlineData(RunState.WaitingForWorkers, 0, "no worker live")]
    [InlineData(RunState.WaitingForWorkers, 1, "waiting for workers")]
    [InlineData(RunState.Training, 0, "no worker live")]
    [InlineData(RunState.Complete, 2, "training complete")]
    [InlineData(RunState.Serving, 2, "serving samples")]
    [InlineData(RunState.Failed, 2, "training stopped")]
    public void IdleFinishedOrStoppedRunsAreAlive(RunState state, int workers, string reason)
    {
        var clock = new ManualClock();
        var watch = new LivenessWatch(TimeSpan.FromSeconds(10), sampleOnly: false, clock);
        watch.Observe(Training(5));
        clock.Advance(9);
        watch.Observe(new LoopReading(state, workers, 5, 0));
        clock.Advance(1_000);
        watch.Observe(new LoopReading(state, workers, 5, 0));
        var verdict = watch.Verdict();
        Assert.True(verdict.Alive);
        Assert.Equal(reason, verdict.Reason);
        // Training resumes at the same step: its timeout counts from then, not from the last step.
        watch.Observe(Training(5));
        clock.Advance(9);
        Assert.True(watch.Verdict().Alive);
        clock.Advance(2);
        Assert.False(watch.Verdict().Alive);
    }

    [Fact]
    public void SampleOnlyAndATimeoutOfZeroAreAlwaysAlive()
    {
        var clock = new ManualClock();
        var sampleOnly = new LivenessWatch(TimeSpan.FromSeconds(10), sampleOnly: true, clock);
        var off = new LivenessWatch(TimeSpan.Zero, sampleOnly: false, clock);
        foreach (var w in new[] { sampleOnly, off }) w.Observe(Training(1));
        clock.Advance(86_400);
        Assert.True(sampleOnly.Verdict().Alive);
        Assert.True(off.Verdict().Alive);
        Assert.Contains("--sample-only", sampleOnly.Verdict().Reason, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(-1)]
    [InlineData(double.NaN)]
    [InlineData(double.PositiveInfinity)]
    public void BadTimeoutsAreRefusedByName(double seconds)
    {
        var e = Assert.Throws<ArgumentException>(() => CoordinatorOptions.ValidateLivenessTimeout(seconds));
        Assert.Contains("--liveness-timeout", e.Message, StringComparison.Ordinal);
        var options = Cluster.Options("unused", steps: 1);
        options.LivenessTimeoutSeconds = seconds;
        Assert.Throws<ArgumentException>(options.Validate);
    }

    [Fact]
    public void ThePollPeriodFollowsTheTimeout()
    {
        Assert.Equal(TimeSpan.FromSeconds(5), LivenessProbe.Period(TimeSpan.FromSeconds(900)));
        Assert.Equal(TimeSpan.FromSeconds(0.2), LivenessProbe.Period(TimeSpan.FromSeconds(2)));
        Assert.Equal(TimeSpan.FromSeconds(0.1), LivenessProbe.Period(TimeSpan.Zero));
    }
}

[Collection(ClusterCollection.Name)]
public sealed class LivenessServiceTests() : TempFolderTest("dd-liveness")
{
    /// <summary>
    /// A worker that takes its slice and sends nothing but heartbeats stalls the step (its deadline is a minute): the
    /// liveness service turns NOT_SERVING after its 1.5 s while "" stays SERVING; the gradient revives it; after training
    /// (--keep-serving) it stays SERVING.
    /// </summary>
    [Fact(Timeout = 120_000)]
    public async Task AStalledStepFailsLivenessAndProgressRevivesIt()
    {
        var options = Cluster.Options(Path.Combine(Dir, "run"), steps: 2);
        options.LivenessTimeoutSeconds = 1.5;
        options.KeepServing = true;
        await using var server = await Cluster.Start(options);
        using var channel = ClientChannel.Create(server.Address);
        var health = new Health.HealthClient(channel);
        HealthCheckResponse.Types.ServingStatus Status(string service) =>
            health.Check(new HealthCheckRequest { Service = service }, deadline: DateTime.UtcNow.AddSeconds(10)).Status;
        const HealthCheckResponse.Types.ServingStatus serving = HealthCheckResponse.Types.ServingStatus.Serving;

        // No worker yet: idle, alive however long it waits.
        await Task.Delay(TimeSpan.FromSeconds(2.5));
        Assert.Equal(serving, Status(LivenessProbe.ServiceName));

        await using var worker = await RawWorker.JoinAsync(server.Address);
        worker.StartHeartbeats();
        var first = await worker.NextAssignmentAsync();
        await Cluster.WaitUntil(() => Status(LivenessProbe.ServiceName) == HealthCheckResponse.Types.ServingStatus.NotServing, TimeSpan.FromSeconds(30), "liveness to fail while the step stalls");
        Assert.Equal(serving, Status(""));
        Assert.Equal(RunState.Training, server.Loop.Status().State);
        Assert.Equal(0ul, server.Loop.Status().Step);

        await worker.SendAllAsync(worker.Push(first, new float[worker.Elements]));
        await Cluster.WaitUntil(() => Status(LivenessProbe.ServiceName) == serving, TimeSpan.FromSeconds(30), "liveness to recover after the step");
        var second = await worker.NextAssignmentAsync();
        await worker.SendAllAsync(worker.Push(second, new float[worker.Elements]));
        await server.Loop.Completion.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.Equal(RunState.Complete, server.Loop.Status().State);
        // Finished, the worker still connected: alive past the timeout.
        await Task.Delay(TimeSpan.FromSeconds(3));
        Assert.Equal(serving, Status(LivenessProbe.ServiceName));
    }
}
