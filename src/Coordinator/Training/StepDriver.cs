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
/// The parts of the run a step's driver works with: the roster, the parameter broadcast, the options, the slice guard,
/// the micro-batch tree, the recent results, the gradient buffers, the run status and counters, the log. All belong to
/// the training loop and are used on its thread.
/// </summary>
internal sealed record StepParts(
    WorkerRoster Workers, ParameterBroadcast Parameters, CoordinatorOptions Options, SliceGuard Guard, MicroBatchTree Tree,
    RecentResults Results, TensorBufferPool GradientBuffers, RunStatus Status, StepCounters Counters, ILogger Log);

/// <summary>What a step's driver asks of the loop that runs it: the next event, and the three it hands back.</summary>
internal interface IStepHost
{
    /// <summary>The next event of the loop's queue, or null after <paramref name="timeout"/>.</summary>
    Task<LoopEvent?> NextEventAsync(TimeSpan timeout, CancellationToken ct);

    /// <summary>A sampling request for the current weights, answered between two events of the step.</summary>
    void Serve(WeightsRequested request);

    /// <summary>A worker's stream ended: the loop removes it (the driver then reassigns its slices).</summary>
    void Gone(WorkerGone gone);

    /// <summary>The step in progress as the stream handlers see it (null: none).</summary>
    void Publish(StepSnapshot? snapshot);
}

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
    private readonly StepParts _parts;
    private readonly IStepHost _host;
    private readonly TrainingState _state;
    private readonly StepPlan _plan;
    private readonly ulong[] _keys;
    private readonly StepRound _round;

    public StepDriver(StepParts parts, IStepHost host, TrainingState state, StepPlan plan)
    {
        _parts = parts;
        _host = host;
        _state = state;
        _plan = plan;
        _keys = state.TrainingStep.SampleKeys(plan.Step, plan.Indices, plan.Epochs);
        // A worker still busy with a slice a backup took from it sits this step out (while others can do the work).
        // ... and a worker that straggled sits out 2, 4, 8, ... steps (up to 256) before it is tried again, so a worker
        // that stays slow costs a wait ever more rarely; one that answers a slice on time starts over.
        var eligible = parts.Workers.Live.Where(w => !w.Schedule.Straggling && (ulong)plan.Step >= w.Schedule.SitOutUntilStep).ToList();
        if (eligible.Count == 0) eligible = parts.Workers.Live.ToList();
        _round = new StepRound((ulong)plan.Step, parts.Parameters.Version, parts.Tree, Math.Min(eligible.Count, parts.Tree.Leaves),
            TimeSpan.FromSeconds(parts.Options.StepDeadlineSeconds), TimeProvider.System);
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
            var e = await _host.NextEventAsync(TimeSpan.FromMilliseconds(round.Snapshot().Done.Any(d => d) ? 10 : 500), ct);
            switch (e)
            {
                case WorkerJoined j:
                    _parts.Workers.Register(j.Worker);
                    break;
                case WorkerGone g:
                    _host.Gone(g);
                    Reassign(g.Worker);
                    break;
                case WeightsRequested w:
                    _host.Serve(w);
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
                        if (why == SliceRejection.Duplicate && _parts.Results.Lookup(gr.Step, gr.Slice) is { Checksum: not null })
                            Compare(gr.Worker, gr.Step, gr.Slice, ChecksumOf(gr));
                        Ack(gr, applied: false, why == SliceRejection.Duplicate ? "duplicate" : "stale");
                        _parts.GradientBuffers.Return(gr.Values);
                        break;
                    }
                    if (!Judge(gr)) break;
                    round.Accept(gr);
                    SlowestCompute = Math.Max(SlowestCompute, gr.ComputeSeconds);
                    // A slice with a second holder (a verification copy, a backup) will be compared: keep its checksum.
                    _parts.Results.Record(gr.Step, gr.Slice, round.HadBackup((int)gr.Slice) ? ChecksumOf(gr) : gr.Checksum, gr.Worker.Id);
                    gr.Worker.CompletedSlice(gr.Step, gr.ComputeSeconds);
                    if (!round.HadBackup((int)gr.Slice)) gr.Worker.Schedule.Straggles = 0;   // on time: no more sitting out
                    if (round.Unfinished(gr.Worker).Count == 0) gr.Worker.State = WorkerState.Idle;
                    Ack(gr, applied: true, "");
                    _host.Publish(round.Snapshot());
                    break;
            }
            foreach (var w in _parts.Workers.Live.ToList())
            {
                var late = round.IsLate(w);
                if (late || w.SecondsSinceSeen > _parts.Options.HeartbeatTimeoutSeconds)
                {
                    var why = late ? $"missed the step deadline ({round.Deadline.TotalSeconds:F0} s) of step {round.Step}" : $"silent for {w.SecondsSinceSeen:F0} s (heartbeat every {_parts.Options.HeartbeatSeconds} s)";
                    w.Abort(StatusCode.DeadlineExceeded, why);
                    _parts.Workers.Remove(w, WorkerState.Dropped, why);
                    Reassign(w);
                }
            }
            BackUpStragglers();
            if (_parts.Workers.Live.Count == 0 && !round.IsComplete)
            {
                _parts.Status.SetState(RunState.WaitingForWorkers);
                if (_parts.Workers.AnyJoining)
                {
                    _parts.Workers.Admit(_state.StepsDone);
                    foreach (var orphan in round.Orphans(_parts.Workers.Live)) Assign(orphan, round.LeastLoaded(_parts.Workers.Live));
                    _parts.Status.SetState(RunState.Training);
                }
            }
        }
        StepTimeline.Mark(StepMark.Complete, round.Step);
        var summing = Stopwatch.GetTimestamp();
        var summed = round.Sum(_parts.GradientBuffers.Return);
        SummingSeconds = Stopwatch.GetElapsedTime(summing).TotalSeconds;
        return summed;
    }

    /// <summary>Seconds <see cref="RunAsync"/> spent summing the slices once all were in (the coordinator's own work, not the exchange).</summary>
    public double SummingSeconds { get; private set; }

    /// <summary>A push (taken, refused or ignored) answers an assignment: the worker is no longer behind on it.</summary>
    public static void Answered(WorkerConnection w, ulong step, uint slice)
    {
        w.Schedule.Outstanding.Remove((step, slice));
        if (w.Schedule.Outstanding.Count == 0) w.Schedule.Straggling = false;
    }

    /// <summary>Tells the worker whether its push went into the step, and why not.</summary>
    public static void Ack(SliceGradient g, bool applied, string note) =>
        g.Worker.Send(new CoordinatorMessage { Ack = new Ack { Step = g.Step, Slice = g.Slice, Applied = applied, Note = note } });

    private void Assign(int slice, WorkerConnection w)
    {
        var round = _round;
        round.Assign(slice, w);
        w.State = WorkerState.Busy;
        w.Schedule.Outstanding.Add((round.Step, (uint)slice));
        if (w.Schedule.ParameterVersion != _parts.Parameters.Version)
            _parts.Parameters.SendTo(w, regionRead: !w.Schedule.Outstanding.Any(o => o.Step < round.Step));
        var (start, end) = round.Bounds(slice);
        var node = round.NodeOf(slice);
        var assignment = new StepAssignment
        {
            Step = round.Step,
            ParameterVersion = _parts.Parameters.Version,
            Slice = (uint)slice,
            GlobalBatchSize = (uint)_state.Recipe.BatchSize,
            FirstMicroBatch = (uint)node.First,
            EndMicroBatch = (uint)node.End,
        };
        assignment.Indices.Add(_plan.Indices[start..end]);
        assignment.SampleSeeds.Add(_keys[start..end]);
        // Published before the assignment goes out: a worker that answers at once (nothing to compute, a fast link)
        // has its gradient header checked against this snapshot, and would otherwise be refused as "not in progress".
        _host.Publish(round.Snapshot());
        w.Send(new CoordinatorMessage { Assignment = assignment });
    }

    // A slow slice (next to this step's others) gets a copy on an idle worker, or its two halves on two.
    private void BackUpStragglers()
    {
        var round = _round;
        foreach (var k in round.Straggling(_parts.Options.StragglerFactor, TimeSpan.FromSeconds(_parts.Options.StragglerMinimumSeconds)))
        {
            var holders = round.HoldersOf(k).ToList();
            var idle = _parts.Workers.Live.Where(w => !w.Schedule.Straggling && !holders.Contains(w) && round.Unfinished(w).Count == 0 && w.Schedule.Outstanding.Count == 0).ToList();
            if (idle.Count == 0) return;
            foreach (var h in holders)
            {
                h.Schedule.Straggling = true;
                h.Schedule.Straggles = Math.Min(h.Schedule.Straggles + 1, 8);
                h.Schedule.SitOutUntilStep = round.Step + (1ul << h.Schedule.Straggles);
            }
            _parts.Counters.BackupIssued();
            var node = round.NodeOf(k);
            if (idle.Count >= 2 && !node.IsLeaf)
            {
                var (l, r) = round.Split(k);
                Assign(l, idle[0]);
                Assign(r, idle[1]);
                _parts.Log.LogInformation("Step {Step} slice {Slice} ({Node}) is slow on {Holder}: its halves go to {Left} and {Right}", round.Step, k, node, holders[0].Id, idle[0].Id, idle[1].Id);
            }
            else
            {
                Assign(k, idle[0]);
                _parts.Log.LogInformation("Step {Step} slice {Slice} ({Node}) is slow on {Holder}: a copy goes to {Backup}", round.Step, k, node, holders[0].Id, idle[0].Id);
            }
        }
    }

    // --verify-fraction: a random share of the slices is also computed by a second worker; the bits must agree.
    private void Verify(List<WorkerConnection> eligible)
    {
        if (_parts.Options.VerifyFraction <= 0 || eligible.Count < 2) return;
        var random = new Random(Randomness.VerifyDraw(_state.Recipe.Seed, _plan.Step));
        for (var i = 0; i < _round.Parts.Length; i++)
            foreach (var k in _round.Parts[i])
                if (random.NextDouble() < _parts.Options.VerifyFraction)
                    Assign(k, eligible[(i + 1 + random.Next(eligible.Count - 1)) % eligible.Count]);
    }

    // The slice guard's verdict on a valid push: true to take it into the step. A refused slice drops its worker (the
    // slice is recomputed elsewhere); a second, independent refusal of the same slice means the values are real.
    private bool Judge(SliceGradient gr)
    {
        var round = _round;
        var batch = _state.Recipe.BatchSize;
        var (start, end) = round.Bounds((int)gr.Slice);
        var fault = _parts.Guard.Check(gr.SumOfSquares, end - start, batch, out var reason);
        if (fault == SliceFault.None)
        {
            _parts.Guard.Accepted(gr.SumOfSquares, end - start, batch);
            return true;
        }
        var agreeing = round.Refuse((int)gr.Slice, gr.Worker, fault);
        if (agreeing >= 2 && fault == SliceFault.NonFinite)
        {
            _parts.GradientBuffers.Return(gr.Values);
            throw new TrainingDivergedException($"training diverged at step {round.Step}: {agreeing} workers computed a non-finite gradient for slice {gr.Slice}");
        }
        if (agreeing >= 2)
        {
            _parts.Log.LogWarning("Step {Step} slice {Slice}: {Reason}, and {Count} workers agree: taken as a real gradient spike", round.Step, gr.Slice, reason, agreeing);
            return true;
        }
        _parts.GradientBuffers.Return(gr.Values);
        var detail = $"gradient of step {round.Step} slice {gr.Slice} refused: {reason}; the slice is recomputed on another worker";
        _parts.Log.LogWarning("Worker {Worker} dropped: {Detail}", gr.Worker.Id, detail);
        Ack(gr, applied: false, detail);
        Drop(gr.Worker, StatusCode.InvalidArgument, detail);
        return false;
    }

    private void Drop(WorkerConnection w, StatusCode code, string detail)
    {
        w.Abort(code, detail);
        _parts.Workers.Remove(w, WorkerState.Dropped, detail);
        Reassign(w);
    }

    // The bits of two computations of one slice must agree; a worker whose bits differ is counted (and dropped after
    // --max-disagreements): a silent-data-corruption signal.
    private void Compare(WorkerConnection w, ulong step, uint slice, ulong? checksum)
    {
        if (_parts.Results.Lookup(step, slice) is not { Checksum: not null } first || checksum is null) return;
        _parts.Counters.ResultCompared();
        if (first.Checksum == checksum) return;
        var count = w.Disagree();
        _parts.Log.LogWarning("Worker {Worker} computed step {Step} slice {Slice} with other bits than {First} (checksum {Theirs:x16} vs {Ours:x16}); {Count} disagreements",
            w.Id, step, slice, first.Worker, checksum, first.Checksum, count);
        if (count >= _parts.Options.MaxDisagreements && _parts.Workers.Live.Contains(w))
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
            if (_parts.Workers.Live.Count == 0)
            {
                _parts.Log.LogWarning("Step {Step} slice {Slice} waits for a worker", round.Step, k);
                continue;
            }
            var to = round.LeastLoaded(_parts.Workers.Live);
            _parts.Log.LogInformation("Step {Step} slice {Slice} ({Samples} samples) of {Gone} goes to {Worker}", round.Step, k, round.Bounds(k).End - round.Bounds(k).Start, gone.Id, to.Id);
            Assign(k, to);
        }
        _host.Publish(round.Snapshot());
    }
}
