using DistDiffusion.Coordinator.Training;
using DistDiffusion.Coordinator.Workers;
using DistDiffusion.Model.Training;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;

namespace DistDiffusion.Tests.Distributed;

/// <summary>The step protocol without processes, sockets or sleeps: a hand-moved clock and fake workers.</summary>
public sealed class StepRoundTests
{
    private sealed class ManualClock : TimeProvider
    {
        private DateTimeOffset _now = new(2026, 1, 1, 0, 0, 0, TimeSpan.Zero);
        public override DateTimeOffset GetUtcNow() => _now;
        public void Advance(TimeSpan by) => _now += by;
    }

    private static WorkerConnection Worker(string host) => new(new Join { Host = host, Device = "cpu", Threads = 1, ProtocolVersion = Names.ProtocolVersion }, "test");

    private static SliceGradient Gradient(WorkerConnection w, ulong step, uint slice, params float[] values) =>
        new(w, step, slice, values, [(byte)1], values.Sum(), 0.01, values.Sum(v => (double)v * v), 0);

    private static MicroBatchTree Tree(int batch = 8, int leaves = 4) => new(batch, leaves);

    [Fact]
    public void PartsAreRunsOfMicroBatchesSentAsTheFewestTreeNodes()
    {
        // 8 leaves over 3 workers: [0,3) [3,6) [6,8) -> nodes [0,2) [2,3) | [3,4) [4,6) | [6,8).
        var round = new StepRound(1, 1, new MicroBatchTree(64, 8), 3, TimeSpan.FromSeconds(30), new ManualClock());
        Assert.Equal(5, round.SliceCount);
        Assert.Equal([[0, 1], [2, 3], [4]], round.Parts.Select(p => p.ToArray()).ToArray());
        Assert.Equal(new[] { new TreeNode(0, 2), new TreeNode(2, 3), new TreeNode(3, 4), new TreeNode(4, 6), new TreeNode(6, 8) },
            Enumerable.Range(0, 5).Select(round.NodeOf).ToArray());
        Assert.Equal((24, 32), round.Bounds(2));
    }

    [Fact]
    public void AcceptsEachSliceOnceFromAHolderAndSumsInTreeOrder()
    {
        var clock = new ManualClock();
        var (a, b) = (Worker("a"), Worker("b"));
        var round = new StepRound(7, 7, Tree(), 2, TimeSpan.FromSeconds(30), clock);
        round.Assign(0, a);
        round.Assign(1, b);
        Assert.Equal(SliceRejection.OtherStep, round.Accept(Gradient(b, 6, 1, 1f, 1f)));
        Assert.Equal(SliceRejection.NoSuchSlice, round.Accept(Gradient(b, 7, 2, 1f, 1f)));
        Assert.Equal(SliceRejection.NotOwner, round.Accept(Gradient(a, 7, 1, 1f, 1f)));
        // Slice 1 arrives first; the sum is still left + right.
        Assert.Equal(SliceRejection.None, round.Accept(Gradient(b, 7, 1, 1e8f, -1e8f)));
        Assert.False(round.IsComplete);
        Assert.Equal(SliceRejection.Duplicate, round.Accept(Gradient(b, 7, 1, 5f, 5f)));
        Assert.Equal(SliceRejection.None, round.Accept(Gradient(a, 7, 0, 1f, 1f)));
        Assert.True(round.IsComplete);
        var released = new List<float[]>();
        var (total, present, loss) = round.Sum(released.Add);
        Assert.Equal([1f + 1e8f, 1f - 1e8f], total);
        Assert.Equal([(byte)1], present);
        Assert.Equal(2.0, loss);
        Assert.Single(released);
    }

    [Fact]
    public void ALateWorkersSlicesAreReassignedAndItsLatePushIsStale()
    {
        var clock = new ManualClock();
        var (a, b) = (Worker("a"), Worker("b"));
        var round = new StepRound(3, 3, Tree(), 2, TimeSpan.FromSeconds(20), clock);
        round.Assign(0, a);
        round.Assign(1, b);
        clock.Advance(TimeSpan.FromSeconds(19));
        Assert.False(round.IsLate(a));
        Assert.Equal(SliceRejection.None, round.Accept(Gradient(a, 3, 0, 1f)));
        clock.Advance(TimeSpan.FromSeconds(2));
        Assert.False(round.IsLate(a));   // its slice is in
        Assert.True(round.IsLate(b));
        // The loop drops b and hands its slices to the least-loaded live worker: a, with a new deadline.
        Assert.Equal([1], round.Unfinished(b));
        Assert.Equal([1], round.Drop(b));
        Assert.Same(a, round.LeastLoaded([a]));
        round.Assign(1, a);
        Assert.False(round.IsLate(a));
        Assert.Equal(SliceRejection.NotOwner, round.Accept(Gradient(b, 3, 1, 9f)));
        Assert.Equal(SliceRejection.None, round.Accept(Gradient(a, 3, 1, 2f)));
        Assert.Equal([3f], round.Sum(_ => { }).Total);
    }

    [Fact]
    public void SlicesWaitForAWorkerWhenNoneIsLiveAndGoToTheOneThatJoins()
    {
        var clock = new ManualClock();
        var (a, c) = (Worker("a"), Worker("c"));
        var round = new StepRound(1, 1, Tree(), 2, TimeSpan.FromSeconds(20), clock);
        round.Assign(0, a);
        round.Assign(1, a);
        Assert.Equal([0, 1], round.Drop(a));   // a left, nobody is live
        Assert.Equal([0, 1], round.Orphans([]));
        Assert.Empty(round.HoldersOf(0));
        foreach (var k in round.Orphans([c])) round.Assign(k, round.LeastLoaded([c]));
        Assert.Equal([0, 1], round.Unfinished(c));
        var snapshot = round.Snapshot();
        Assert.Equal(new[] { c.Id, c.Id }, snapshot.Holders.Select(h => Assert.Single(h)).ToArray());
        Assert.Equal([4, 4], snapshot.SliceSizes);
    }

    [Fact]
    public void LeastLoadedPrefersTheWorkerWithFewestUnfinishedSlices()
    {
        var (a, b) = (Worker("a"), Worker("b"));
        var round = new StepRound(1, 1, new MicroBatchTree(9, 3), 3, TimeSpan.FromSeconds(20), new ManualClock());
        round.Assign(0, a);
        round.Assign(1, a);
        round.Assign(2, b);
        Assert.Same(b, round.LeastLoaded([a, b]));
    }

    [Fact]
    public void ASlowSliceIsFlaggedOnceTheOthersAreInAndACopyOrItsHalvesCompleteTheStep()
    {
        var clock = new ManualClock();
        var (a, b, c, d) = (Worker("a"), Worker("b"), Worker("c"), Worker("d"));
        // 4 leaves, 2 parts: slice 0 = [0,2) on a, slice 1 = [2,4) on b.
        var round = new StepRound(5, 5, Tree(), 2, TimeSpan.FromSeconds(600), clock);
        round.Assign(0, a);
        round.Assign(1, b);
        clock.Advance(TimeSpan.FromSeconds(1));
        Assert.Empty(round.Straggling(2, TimeSpan.Zero));            // nothing is in: no median yet
        Assert.Equal(SliceRejection.None, round.Accept(Gradient(a, 5, 0, 1f)));
        clock.Advance(TimeSpan.FromSeconds(0.9));
        Assert.Empty(round.Straggling(2, TimeSpan.Zero));            // b has held its slice 1.9 s, a took 1 s
        clock.Advance(TimeSpan.FromSeconds(0.2));
        Assert.Equal([1], round.Straggling(2, TimeSpan.Zero));
        Assert.Empty(round.Straggling(2, TimeSpan.FromSeconds(5)));  // below the minimum
        // Its halves go to c and d; once both are in, the step is complete without b.
        var (left, right) = round.Split(1);
        round.Assign(left, c);
        round.Assign(right, d);
        Assert.Empty(round.Straggling(2, TimeSpan.Zero));            // already has copies
        Assert.Equal(SliceRejection.None, round.Accept(Gradient(c, 5, (uint)left, 2f)));
        Assert.False(round.IsComplete);
        Assert.Equal(SliceRejection.None, round.Accept(Gradient(d, 5, (uint)right, 4f)));
        Assert.True(round.IsComplete);
        Assert.True(round.IsDone(1));
        Assert.Empty(round.Unfinished(b));
        Assert.Equal(SliceRejection.Duplicate, round.Accept(Gradient(b, 5, 1, 6f)));   // b's late result: a duplicate
        var released = new List<float[]>();
        Assert.Equal([7f], round.Sum(released.Add).Total);            // a + (c + d)
        Assert.Equal(2, released.Count);
    }

    [Fact]
    public void AFirstResultFromAnyHolderCompletesASliceAndTheOtherIsADuplicate()
    {
        var (a, b) = (Worker("a"), Worker("b"));
        var round = new StepRound(2, 2, Tree(), 1, TimeSpan.FromSeconds(600), new ManualClock());
        round.Assign(0, a);
        round.Assign(0, b);   // a backup or a verification copy
        Assert.Throws<InvalidOperationException>(() => round.Assign(0, b));
        Assert.Equal(SliceRejection.None, round.Accept(Gradient(b, 2, 0, 3f)));
        Assert.Equal(SliceRejection.Duplicate, round.Accept(Gradient(a, 2, 0, 3f)));
        Assert.Same(b, round.ResultOf(0)!.Worker);
        Assert.Empty(round.Drop(a));   // nothing left to reassign
    }

    [Fact]
    public void RefusalsAreCountedPerSliceFaultAndConnection()
    {
        var (a, b) = (Worker("a"), Worker("b"));
        var round = new StepRound(3, 3, Tree(), 2, TimeSpan.FromSeconds(30), new ManualClock());
        Assert.Equal(1, round.Refuse(0, a, SliceFault.NonFinite));
        Assert.Equal(1, round.Refuse(0, a, SliceFault.NonFinite));   // the same connection twice is one opinion
        Assert.Equal(1, round.Refuse(1, b, SliceFault.NonFinite));   // another slice
        Assert.Equal(1, round.Refuse(0, b, SliceFault.OutOfBound));  // another fault
        Assert.Equal(2, round.Refuse(0, b, SliceFault.NonFinite));
    }
}

/// <summary>What one slice may contribute: the per-sample norm against an absolute bound, then against recent history.</summary>
public sealed class SliceGuardTests
{
    private const int Batch = 256;

    [Fact]
    public void BeforeAnyHistoryOnlyTheAbsoluteBoundApplies()
    {
        var guard = new SliceGuard();
        Assert.Equal(SliceFault.None, guard.Check(1e3, 128, Batch, out _));
        // Every element 1e15 in a 477,442-parameter gradient: squares finite, norm far beyond the bound.
        var huge = 477_442 * 1e30;
        Assert.Equal(SliceFault.OutOfBound, guard.Check(huge, 128, Batch, out var why));
        Assert.Contains("exceeds the bound", why);
        Assert.Equal(SliceFault.NonFinite, guard.Check(double.NaN, 128, Batch, out _));
        Assert.Equal(SliceFault.NonFinite, guard.Check(double.PositiveInfinity, 128, Batch, out _));
    }

    [Fact]
    public void AfterWarmupTheBoundIsARatioOfTheMedianPerSampleNorm()
    {
        var guard = new SliceGuard(ratio: 10);
        // Slices of 128 and 64 samples with the same per-sample norm 2: ||g|| * 256 / n = 2.
        for (var i = 0; i < SliceGuard.WarmupSlices; i++)
        {
            var n = i % 2 == 0 ? 128 : 64;
            var norm = 2.0 * n / Batch;
            guard.Accepted(norm * norm, n, Batch);
        }
        Assert.Equal(20, guard.Bound, 9);
        var within = 19.0 * 64 / Batch;
        Assert.Equal(SliceFault.None, guard.Check(within * within, 64, Batch, out _));
        var beyond = 21.0 * 64 / Batch;
        Assert.Equal(SliceFault.OutOfBound, guard.Check(beyond * beyond, 64, Batch, out var why));
        Assert.Contains("10 x the median 2", why);
    }

    [Fact]
    public void TheMedianFollowsTheLastWindowOfSlices()
    {
        var guard = new SliceGuard(ratio: 10);
        for (var i = 0; i < SliceGuard.Window; i++) guard.Accepted(1.0, Batch, Batch);          // per-sample norm 1
        for (var i = 0; i < SliceGuard.Window; i++) guard.Accepted(1e-4, Batch, Batch);         // then 0.01
        Assert.Equal(0.1, guard.Bound, 9);
    }

    [Theory]
    [InlineData(0.5)]
    [InlineData(double.NaN)]
    [InlineData(double.PositiveInfinity)]
    public void ABadRatioIsRefused(double ratio) => Assert.Throws<ArgumentOutOfRangeException>(() => new SliceGuard(ratio));
}
