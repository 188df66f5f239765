using System.Diagnostics;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Workers;
using DistDiffusion.Model.Training;
using DistDiffusion.Model;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Grpc.Core;
using Microsoft.Extensions.Logging;

namespace DistDiffusion.Coordinator.Training;

/// <summary>
/// What a step's driver uses of the loop that owns the run: its parts (roster, broadcast, guard, tree, results, buffers,
/// status), its event queue and the two events it answers itself, and where the step in progress is published for the
/// stream handlers.
/// </summary>
internal sealed record StepServices(
    WorkerRoster Workers, ParameterBroadcast Parameters, CoordinatorOptions Options, SliceGuard Guard, MicroBatchTree Tree,
    RecentResults Results, TensorBufferPool GradientBuffers, RunStatus Status, StepCounters Counters, ILogger Log,
    Func<TimeSpan, CancellationToken, Task<LoopEvent?>> NextEvent, Action<WeightsRequested> Serve, Action<WorkerGone> Gone,
    Action<StepSnapshot?> Publish);

/// <summary>Counts over the run that tests and benchmarks read while it goes on.</summary>
internal sealed class StepCounters
{
    private long _backups;
    private long _compared;

    /// <summary>Slow slices given a copy (or their halves) on idle workers so far.</summary>
    public long BackupsIssued => Interlocked.Read(ref _backups);

    /// <summary>Second results (straggler copies, verifications) whose bits were compared with the first.</summary>
    public long ResultsCompared => Interlocked.Read(ref _compared);

    public void BackupIssued() => Interlocked.Increment(ref _backups);

    public void ResultCompared() => Interlocked.Increment(ref _compared);
}

/// <summary>
/// One step of the parameter server, from its plan to its summed gradient: the policy around the step's
/// <see cref="StepRound"/> (which holds the protocol's state). The constructor hands each eligible worker its slices (and,
/// with --verify-fraction, copies of some to a second worker); <see cref="RunAsync"/> then handles every event until all
/// slices are in: a push is checked against the round, judged by the slice guard and accepted once; a duplicate's bits are
/// compared with the first result; a worker that leaves, misses the step deadline or falls silent is dropped and its
/// slices reassigned; a slow slice is backed up on an idle worker; with no live worker left the step waits for one.
/// </summary>
internal sealed class StepDriver
{
    private readonly StepServices _loop;
    private readonly TrainingState _state;
    private readonly StepPlan _plan;
    private readonly ulong[] _keys;
    private readonly StepRound _round;

    public StepDriver(StepServices loop, TrainingState state, StepPlan plan)
    {
        _loop = loop;
        _state = state;
        _plan = plan;
        _keys = state.TrainingStep.SampleKeys(plan.Step, plan.Indices, plan.Epochs);
        // A worker still busy with a slice a backup took from it sits this step out (while others can do the work).
        // ... and a worker that straggled sits out 2, 4, 8, ... steps (up to 256) before it is tried again, so a worker
        // that stays slow costs a wait ever more rarely; one that answers a slice on time starts over.
        var eligible = loop.Workers.Live.Where(w => !w.Straggling && (ulong)plan.Step >= w.SitOutUntilStep).ToList();
        if (eligible.Count == 0) eligible = loop.Workers.Live.ToList();
        _round = new StepRound((ulong)plan.Step, loop.Parameters.Version, loop.Tree, Math.Min(eligible.Count, loop.Tree.Leaves),
            TimeSpan.FromSeconds(loop.Options.StepDeadlineSeconds), TimeProvider.System);
        for (var i = 0; i < _round.Parts.Length; i++)
            foreach (var k in _round.Parts[i]) Assign(k, eligible[i]);
        Verify(eligible);
    }

    /// <summary>The longest compute time a worker reported for a slice of this step (seconds).</summary>
    public double SlowestCompute { get; private set; }

    /// <summary>
    /// Handles events until every slice is in, then sums them in slice order: the global batch's gradient (each slice is
    /// already divided by the global batch size), which parameters have one, and the batch's loss.
    /// </summary>
    public async Task<(float[] Total, byte[] Present, double Loss)> RunAsync(CancellationToken ct)
    {
        var round = _round;
        while (!round.IsComplete)
        {
            // Short waits once a slice is in: the stragglers' check below needs a clock, not an event.
            var e = await _loop.NextEvent(TimeSpan.FromMilliseconds(round.Snapshot().Done.Any(d => d) ? 10 : 500), ct);
            switch (e)
            {
                case WorkerJoined j:
                    _loop.Workers.Register(j.Worker);
                    break;
                case WorkerGone g:
                    _loop.Gone(g);
                    Reassign(g.Worker);
                    break;
                case WeightsRequested w:
                    _loop.Serve(w);
                    break;
                case DuplicateSeen d:
                    Answered(d.Worker, d.Step, d.Slice);
                    if (d.Checksum is { } sum) Compare(d.Worker, d.Step, d.Slice, sum);
                    break;
                case GradientArrived { Gradient: var gr }:
                    StepTimeline.Mark(StepMark.Taken, gr.Step);
                    Answered(gr.Worker, gr.Step, gr.Slice);
                    if (round.Validate(gr) is not SliceRejection.None and var why)
                    {
                        if (why == SliceRejection.Duplicate && _loop.Results.Lookup(gr.Step, gr.Slice) is { Checksum: not null })
                            Compare(gr.Worker, gr.Step, gr.Slice, ChecksumOf(gr));
                        Ack(gr, applied: false, why == SliceRejection.Duplicate ? "duplicate" : "stale");
                        _loop.GradientBuffers.Return(gr.Values);
                        break;
                    }
                    if (!Judge(gr)) break;
                    round.Accept(gr);
                    SlowestCompute = Math.Max(SlowestCompute, gr.ComputeSeconds);
                    // A slice with a second holder (a verification copy, a backup) will be compared: keep its checksum.
                    _loop.Results.Record(gr.Step, gr.Slice, round.HadBackup((int)gr.Slice) ? ChecksumOf(gr) : gr.Checksum, gr.Worker.Id);
                    gr.Worker.CompletedSlice(gr.Step, gr.ComputeSeconds);
                    if (!round.HadBackup((int)gr.Slice)) gr.Worker.Straggles = 0;   // on time: no more sitting out
                    if (round.Unfinished(gr.Worker).Count == 0) gr.Worker.State = WorkerState.Idle;
                    Ack(gr, applied: true, "");
                    _loop.Publish(round.Snapshot());
                    break;
            }
            foreach (var w in _loop.Workers.Live.ToList())
            {
                var late = round.IsLate(w);
                if (late || w.SecondsSinceSeen > _loop.Options.HeartbeatTimeoutSeconds)
                {
                    var why = late ? $"missed the step deadline ({round.Deadline.TotalSeconds:F0} s) of step {round.Step}" : $"silent for {w.SecondsSinceSeen:F0} s (heartbeat every {_loop.Options.HeartbeatSeconds} s)";
                    w.Abort(StatusCode.DeadlineExceeded, why);
                    _loop.Workers.Remove(w, WorkerState.Dropped, why);
                    Reassign(w);
                }
            }
            BackUpStragglers();
            if (_loop.Workers.Live.Count == 0 && !round.IsComplete)
            {
                _loop.Status.SetState(RunState.WaitingForWorkers);
                if (_loop.Workers.AnyJoining)
                {
                    _loop.Workers.Admit(_state.StepsDone);
                    foreach (var orphan in round.Orphans(_loop.Workers.Live)) Assign(orphan, round.LeastLoaded(_loop.Workers.Live));
                    _loop.Status.SetState(RunState.Training);
                }
            }
        }
        StepTimeline.Mark(StepMark.Complete, round.Step);
        var summing = Stopwatch.GetTimestamp();
        var summed = round.Sum(_loop.GradientBuffers.Return);
        SummingSeconds = Stopwatch.GetElapsedTime(summing).TotalSeconds;
        return summed;
    }

    /// <summary>Seconds <see cref="RunAsync"/> spent summing the slices once all were in (the coordinator's own work, not the exchange).</summary>
    public double SummingSeconds { get; private set; }

    /// <summary>A push (taken, refused or ignored) answers an assignment: the worker is no longer behind on it.</summary>
    public static void Answered(WorkerConnection w, ulong step, uint slice)
    {
        w.Outstanding.Remove((step, slice));
        if (w.Outstanding.Count == 0) w.Straggling = false;
    }

    /// <summary>Tells the worker whether its push went into the step, and why not.</summary>
    public static void Ack(SliceGradient g, bool applied, string note) =>
        g.Worker.Send(new CoordinatorMessage { Ack = new Ack { Step = g.Step, Slice = g.Slice, Applied = applied, Note = note } });

    private void Assign(int slice, WorkerConnection w)
    {
        var round = _round;
        round.Assign(slice, w);
        w.State = WorkerState.Busy;
        w.Outstanding.Add((round.Step, (uint)slice));
        if (w.ParameterVersion != _loop.Parameters.Version)
            _loop.Parameters.SendTo(w, regionRead: !w.Outstanding.Any(o => o.Step < round.Step));
        var (start, end) = round.Bounds(slice);
        var node = round.NodeOf(slice);
        var assignment = new StepAssignment
        {
            Step = round.Step,
            ParameterVersion = _loop.Parameters.Version,
            Slice = (uint)slice,
            GlobalBatchSize = (uint)_state.Recipe.BatchSize,
            FirstMicroBatch = (uint)node.First,
            EndMicroBatch = (uint)node.End,
        };
        assignment.Indices.Add(_plan.Indices[start..end]);
        assignment.SampleSeeds.Add(_keys[start..end]);
        // Published before the assignment goes out: a worker that answers at once (nothing to compute, a fast link)
        // has its gradient header checked against this snapshot, and would otherwise be refused as "not in progress".
        _loop.Publish(round.Snapshot());
        w.Send(new CoordinatorMessage { Assignment = assignment });
    }

    // A slow slice (next to this step's others) gets a copy on an idle worker, or its two halves on two.
    private void BackUpStragglers()
    {
        var round = _round;
        foreach (var k in round.Straggling(_loop.Options.StragglerFactor, TimeSpan.FromSeconds(_loop.Options.StragglerMinimumSeconds)))
        {
            var holders = round.HoldersOf(k).ToList();
            var idle = _loop.Workers.Live.Where(w => !w.Straggling && !holders.Contains(w) && round.Unfinished(w).Count == 0 && w.Outstanding.Count == 0).ToList();
            if (idle.Count == 0) return;
            foreach (var h in holders)
            {
                h.Straggling = true;
                h.Straggles = Math.Min(h.Straggles + 1, 8);
                h.SitOutUntilStep = round.Step + (1ul << h.Straggles);
            }
            _loop.Counters.BackupIssued();
            var node = round.NodeOf(k);
            if (idle.Count >= 2 && !node.IsLeaf)
            {
                var (l, r) = round.Split(k);
                Assign(l, idle[0]);
                Assign(r, idle[1]);
                _loop.Log.LogInformation("Step {Step} slice {Slice} ({Node}) is slow on {Holder}: its halves go to {Left} and {Right}", round.Step, k, node, holders[0].Id, idle[0].Id, idle[1].Id);
            }
            else
            {
                Assign(k, idle[0]);
                _loop.Log.LogInformation("Step {Step} slice {Slice} ({Node}) is slow on {Holder}: a copy goes to {Backup}", round.Step, k, node, holders[0].Id, idle[0].Id);
            }
        }
    }

    // --verify-fraction: a random share of the slices is also computed by a second worker; the bits must agree.
    private void Verify(List<WorkerConnection> eligible)
    {
        if (_loop.Options.VerifyFraction <= 0 || eligible.Count < 2) return;
        var random = new Random(Randomness.VerifyDraw(_state.Recipe.Seed, _plan.Step));
        for (var i = 0; i < _round.Parts.Length; i++)
            foreach (var k in _round.Parts[i])
                if (random.NextDouble() < _loop.Options.VerifyFraction)
                    Assign(k, eligible[(i + 1 + random.Next(eligible.Count - 1)) % eligible.Count]);
    }

    // The slice guard's verdict on a valid push: true to take it into the step. A refused slice drops its worker (the
    // slice is recomputed elsewhere); a second, independent refusal of the same slice means the values are real.
    private bool Judge(SliceGradient gr)
    {
        var round = _round;
        var batch = _state.Recipe.BatchSize;
        var (start, end) = round.Bounds((int)gr.Slice);
        var fault = _loop.Guard.Check(gr.SumOfSquares, end - start, batch, out var reason);
        if (fault == SliceFault.None)
        {
            _loop.Guard.Accepted(gr.SumOfSquares, end - start, batch);
            return true;
        }
        var agreeing = round.Refuse((int)gr.Slice, gr.Worker, fault);
        if (agreeing >= 2 && fault == SliceFault.NonFinite)
        {
            _loop.GradientBuffers.Return(gr.Values);
            throw new TrainingDivergedException($"training diverged at step {round.Step}: {agreeing} workers computed a non-finite gradient for slice {gr.Slice}");
        }
        if (agreeing >= 2)
        {
            _loop.Log.LogWarning("Step {Step} slice {Slice}: {Reason}, and {Count} workers agree: taken as a real gradient spike", round.Step, gr.Slice, reason, agreeing);
            return true;
        }
        _loop.GradientBuffers.Return(gr.Values);
        var detail = $"gradient of step {round.Step} slice {gr.Slice} refused: {reason}; the slice is recomputed on another worker";
        _loop.Log.LogWarning("Worker {Worker} dropped: {Detail}", gr.Worker.Id, detail);
        Ack(gr, applied: false, detail);
        Drop(gr.Worker, StatusCode.InvalidArgument, detail);
        return false;
    }

    private void Drop(WorkerConnection w, StatusCode code, string detail)
    {
        w.Abort(code, detail);
        _loop.Workers.Remove(w, WorkerState.Dropped, detail);
        Reassign(w);
    }

    // The bits of two computations of one slice must agree; a worker whose bits differ is counted (and dropped after
    // --max-disagreements): a silent-data-corruption signal.
    private void Compare(WorkerConnection w, ulong step, uint slice, ulong? checksum)
    {
        if (_loop.Results.Lookup(step, slice) is not { Checksum: not null } first || checksum is null) return;
        _loop.Counters.ResultCompared();
        if (first.Checksum == checksum) return;
        var count = w.Disagree();
        _loop.Log.LogWarning("Worker {Worker} computed step {Step} slice {Slice} with other bits than {First} (checksum {Theirs:x16} vs {Ours:x16}); {Count} disagreements",
            w.Id, step, slice, first.Worker, checksum, first.Checksum, count);
        if (count >= _loop.Options.MaxDisagreements && _loop.Workers.Live.Contains(w))
            Drop(w, StatusCode.DataLoss, $"computed {count} slices with other bits than other workers (last: step {step} slice {slice})");
    }

    /// <summary>The checksum of a push's bytes: the header's, or for one that came through shared memory the hash of the loop's copy.</summary>
    private static ulong ChecksumOf(SliceGradient g) =>
        g.Checksum ?? TensorTransport.Checksum(g.Values);

    private void Reassign(WorkerConnection gone)
    {
        var round = _round;
        foreach (var k in round.Drop(gone))
        {
            if (_loop.Workers.Live.Count == 0)
            {
                _loop.Log.LogWarning("Step {Step} slice {Slice} waits for a worker", round.Step, k);
                continue;
            }
            var to = round.LeastLoaded(_loop.Workers.Live);
            _loop.Log.LogInformation("Step {Step} slice {Slice} ({Samples} samples) of {Gone} goes to {Worker}", round.Step, k, round.Bounds(k).End - round.Bounds(k).Start, gone.Id, to.Id);
            Assign(k, to);
        }
        _loop.Publish(round.Snapshot());
    }
}
