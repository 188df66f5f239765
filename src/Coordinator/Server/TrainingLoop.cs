using System.Diagnostics;
using System.Threading.Channels;
using DistDiffusion.Model;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Training;
using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;
using Grpc.Core;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace DistDiffusion.Coordinator.Server;

/// <summary>
/// A finished slice gradient, decoded and checksum-verified by the stream handler, with its sum of squares in double
/// (non-finite when an element is) for the loop's <see cref="SliceGuard"/>, and the checksum of its bytes as sent.
/// </summary>
internal sealed record SliceGradient(WorkerConnection Worker, ulong Step, uint Slice, float[] Values, byte[] Present, double Loss, double ComputeSeconds, double SumOfSquares, ulong Checksum);

/// <summary>What the stream handlers tell the loop.</summary>
internal abstract record LoopEvent;
internal sealed record WorkerJoined(WorkerConnection Worker) : LoopEvent;
internal sealed record WorkerGone(WorkerConnection Worker, string Reason) : LoopEvent;
internal sealed record GradientArrived(SliceGradient Gradient) : LoopEvent;

/// <summary>A request from the sampling side for the current weights (served by the loop, which owns them).</summary>
internal sealed record WeightsRequested(bool PreferEma, TaskCompletionSource<WeightsSnapshot> Reply) : LoopEvent;

/// <summary>How the last step's wall time divides: the slowest worker's computing, the rest of the wait, the coordinator's own work.</summary>
public readonly record struct StepSplit(double ComputeSeconds, double ExchangeSeconds, double UpdateSeconds);

/// <summary>What the metrics endpoint reads besides <see cref="TrainingLoop.Status"/>.</summary>
public readonly record struct Telemetry(double GradNorm, StepSplit LastStep, double? CheckpointAgeSeconds);

/// <summary>One consistent set of weights to sample with: id (cache key on workers), parameter version, EMA or raw, float32 bytes.</summary>
public sealed record WeightsSnapshot(ulong Id, ulong Version, bool Ema, byte[] Bytes, TensorHeader Header);

/// <summary>The step in progress as the stream handlers see it (immutable; replaced as slices move).</summary>
internal sealed record StepSnapshot(ulong Step, ulong Version, int[] SliceSizes, string[][] Holders, bool[] Done);

/// <summary>A push the stream handler ignored (already in, or for a finished step): the loop compares its checksum.</summary>
internal sealed record DuplicateSeen(WorkerConnection Worker, ulong Step, uint Slice, ulong? Checksum) : LoopEvent;

/// <summary>
/// The parameter server's training loop (synchronous data parallelism). For each step it plans the global batch,
/// cuts it into one contiguous slice per live worker, sends each worker the current parameters (when it lacks
/// them) and its slice (indices and one seed per sample), gathers the slice gradients, sums them in slice
/// order — each is already divided by the global batch size, so the sum is the global-batch mean — and applies
/// Adam and EMA through <see cref="TrainingState.ApplyGradients"/>, the same update `coordinator train` runs.
/// A worker that disconnects or misses the deadline is dropped and its slices go to the others, so every step
/// has exactly its planned samples. Workers that join are admitted at the next step boundary.
/// All torch work happens on this loop; handlers only decode and validate bytes.
/// </summary>
public sealed class TrainingLoop : BackgroundService
{
    private readonly RunSetup _run;
    private readonly CoordinatorOptions _options;
    private readonly ILogger<TrainingLoop> _log;
    private readonly IHostApplicationLifetime _lifetime;
    private readonly Channel<LoopEvent> _events = Channel.CreateUnbounded<LoopEvent>();
    private readonly ParameterVector _vector;
    private readonly WorkerRoster _workers;
    private readonly object _statusLock = new();
    private readonly ParameterBroadcast _parameters;
    private readonly SliceGuard _guard;
    private readonly MicroBatchTree _tree;
    private readonly RecentResults _results = new();
    /// <summary>False only while an update is being applied: a checkpoint taken then would mix two steps.</summary>
    private bool _stateConsistent = true;
    private volatile StepSnapshot? _current;
    private RunState _state = RunState.WaitingForWorkers;
    private double _loss = double.NaN, _samplesPerSecond;
    private string _lastCheckpoint = "";
    private long _lastCheckpointStep = -1;
    private long _lastCheckpointAt;
    private double _gradNorm = double.NaN;
    private StepSplit _lastSplit = new(0, 0, 0);
    private double _stepCompute;
    private readonly Observe.MetricsJournal _journal;
    private readonly Observe.StepInterval _interval = new();

    private readonly PeriodicSamples? _samples;

    public TrainingLoop(RunSetup run, CoordinatorOptions options, ILogger<TrainingLoop> log, IHostApplicationLifetime lifetime, PeriodicSamples? samples = null)
    {
        _samples = samples;
        _run = run;
        _options = options;
        _log = log;
        _lifetime = lifetime;
        _workers = new WorkerRoster(_statusLock, log);
        _vector = ParameterVector.Of(run.State.Network);
        run.State.Optimizer.UpdateThreads = Math.Clamp(Environment.ProcessorCount, 1, 4);
        GradientBuffers = new TensorBufferPool(_vector.Elements);
        var emaVector = run.State.Ema is { } ema ? new ParameterVector(_vector.Shapes.Select(p => (p.Name, ema.Weights[p.Name]))) : null;
        _parameters = new ParameterBroadcast(_vector, emaVector);
        _guard = new SliceGuard(options.GradientBoundRatio);
        _tree = MicroBatchTree.For(run.State.Recipe);
        RunId = Guid.NewGuid().ToString("N")[..12];
        GradientDtype = options.ParseGradientDtype();
        RecipeJson = run.State.Recipe.ToJson();
        _parameters.Publish((ulong)run.State.StepsDone, (ulong)run.State.StepsDone);
        // The checkpoint this state came from (not merely the highest step folder, which may be the damaged one skipped).
        if (run.LastCheckpoint is { } last) (_lastCheckpoint, _lastCheckpointStep) = (last.Folder, last.Step);
        _journal = new Observe.MetricsJournal(run.RunDir);
    }

    /// <summary>OUT/metrics.jsonl and OUT/loss.png.</summary>
    public Observe.MetricsJournal Journal => _journal;

    public Telemetry ReadTelemetry()
    {
        lock (_statusLock)
            return new Telemetry(_gradNorm, _lastSplit, _lastCheckpointAt == 0 ? null : Stopwatch.GetElapsedTime(_lastCheckpointAt).TotalSeconds);
    }

    public string RunId { get; }
    /// <summary>Where the stream handlers receive gradients; the loop returns each buffer once summed.</summary>
    public TensorBufferPool GradientBuffers { get; }
    public string RecipeJson { get; }
    public DType GradientDtype { get; }
    public long ParameterElements => _vector.Elements;
    public int ParameterCount => _vector.Count;
    public long TrainSize => _run.TrainSize;
    public IEnumerable<ParameterInfo> ParameterInfos => _vector.Shapes.Select(s => new ParameterInfo { Name = s.Name, Shape = { s.Shape } });
    internal StepSnapshot? Current => _current;
    /// <summary>Checksum of the current parameters (what workers are sent): tests use it to see that nothing changed.</summary>
    public ulong ParameterChecksum => _parameters.Header.Checksum;
    public long StepsDone => _run.State.StepsDone;
    /// <summary>
    /// Seconds the loop spent computing (planning, summing gradients, Adam, EMA, serializing parameters) rather than
    /// waiting for workers: the benchmark subtracts it to isolate the exchange itself.
    /// </summary>
    public double BusySeconds => Volatile.Read(ref _busySeconds);
    private double _busySeconds;
    /// <summary>Slow slices given a copy (or their halves) on idle workers so far.</summary>
    public long BackupsIssued => Interlocked.Read(ref _backups);
    private long _backups;
    /// <summary>Second results (straggler copies, verifications) whose bits were compared with the first.</summary>
    public long ResultsCompared => Interlocked.Read(ref _compared);
    private long _compared;
    /// <summary>Completes when training reached its target step and the final checkpoint is written.</summary>
    public Task Completion => _completion.Task;
    private readonly TaskCompletionSource _completion = new(TaskCreationOptions.RunContinuationsAsynchronously);

    internal void Post(LoopEvent e) => _events.Writer.TryWrite(e);

    /// <summary>The current weights (EMA when preferred and kept), read by the loop between steps.</summary>
    public Task<WeightsSnapshot> SnapshotAsync(bool preferEma, CancellationToken ct)
    {
        var reply = new TaskCompletionSource<WeightsSnapshot>(TaskCreationOptions.RunContinuationsAsynchronously);
        Post(new WeightsRequested(preferEma, reply));
        return reply.Task.WaitAsync(ct);
    }

    public Model.Training.Recipe Recipe => _run.State.Recipe;

    private void Serve(WeightsRequested request)
    {
        try
        {
            WeightsSnapshot snapshot;
            using (Model.TorchRuntime.Compute())
            {
                _run.State.FlushEma();
                snapshot = _parameters.Snapshot(request.PreferEma, (ulong)_run.State.StepsDone);
            }
            request.Reply.TrySetResult(snapshot);
        }
#pragma warning disable CA1031 // the failure is handed to the waiting requester, not swallowed
        catch (Exception e)
#pragma warning restore CA1031
        {
            request.Reply.TrySetException(e);
        }
    }

    public StatusReply Status()
    {
        var s = _run.State;
        var reply = new StatusReply
        {
            Recipe = s.Recipe.Name,
            RecipeJson = RecipeJson,
            TargetStep = (ulong)_run.TargetStep,
            RunId = RunId,
        };
        lock (_statusLock)
        {
            reply.Step = (ulong)s.StepsDone;
            reply.Epoch = s.Cursor.Epoch;
            reply.ParameterVersion = _parameters.Version;
            reply.State = _state;
            reply.Loss = _loss;
            reply.SamplesPerSecond = _samplesPerSecond;
            reply.LastCheckpoint = _lastCheckpoint;
            reply.LastCheckpointStep = _lastCheckpointStep < 0 ? 0 : (ulong)_lastCheckpointStep;
            reply.Workers.AddRange(_workers.Statuses());
        }
        return reply;
    }

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        await Task.Yield();
        // Stop at the first sign of shutdown (SIGTERM, Ctrl+C): ApplicationStopping fires before Kestrel's graceful
        // shutdown, which would otherwise wait for the workers' streams while training went on.
        using var stopping = CancellationTokenSource.CreateLinkedTokenSource(stoppingToken, _lifetime.ApplicationStopping);
        await RunAsync(stopping.Token);
    }

    private async Task RunAsync(CancellationToken stoppingToken)
    {
        var s = _run.State;
        s.Network.train();
        try
        {
            _log.LogInformation("Run {RunId}: recipe {Recipe}, {Parameters} parameters, batch {Batch}, from step {Step} to {Target}, gradients as {Dtype}",
                RunId, s.Recipe.Name, _vector.Elements, s.Recipe.BatchSize, s.StepsDone, _run.TargetStep, GradientDtype);
            var waitingLogged = false;
            var started = false;
            var clock = Stopwatch.StartNew();
            while (s.StepsDone < _run.TargetStep)
            {
                stoppingToken.ThrowIfCancellationRequested();
                _workers.Admit(_run.State.StepsDone);
                var needed = started ? 1 : _options.MinWorkers;
                if (_workers.Live.Count < needed)
                {
                    SetState(RunState.WaitingForWorkers);
                    if (!waitingLogged) _log.LogWarning("Waiting for workers: {Live} of {Needed} live (step {Step} of {Target})", _workers.Live.Count, needed, s.StepsDone, _run.TargetStep);
                    waitingLogged = true;
                    await HandleNextAsync(TimeSpan.FromSeconds(1), stoppingToken);
                    continue;
                }
                waitingLogged = false;
                started = true;
                SetState(RunState.Training);
                clock.Restart();
                var busyBefore = _busySeconds;
                var (loss, norm) = await RunStepAsync(stoppingToken);
                var seconds = clock.Elapsed.TotalSeconds;
                var update = Math.Min(seconds, _busySeconds - busyBefore);
                var compute = Math.Clamp(_stepCompute, 0, seconds - update);
                var split = new StepSplit(compute, Math.Max(0, seconds - update - compute), update);
                lock (_statusLock)
                {
                    _gradNorm = norm;
                    _lastSplit = split;
                    _loss = double.IsNaN(_loss) ? loss : 0.9 * _loss + 0.1 * loss;
                    var rate = s.Recipe.BatchSize / Math.Max(seconds, 1e-9);
                    _samplesPerSecond = _samplesPerSecond == 0 ? rate : 0.9 * _samplesPerSecond + 0.1 * rate;
                }
                _log.LogDebug("Step {Step}: loss {Loss:G4}, gradient norm {Norm:G4}, {Seconds:F3} s over {Workers} workers", s.StepsDone, loss, norm, seconds, _workers.Live.Count);
                _interval.Add(loss, s.Recipe.BatchSize);
                if (s.StepsDone % _options.LogEvery == 0 || s.StepsDone == _run.TargetStep) Record(split, norm);
                if (s.Recipe.CheckpointEvery > 0 && s.StepsDone % s.Recipe.CheckpointEvery == 0 && s.StepsDone < _run.TargetStep)
                    SaveCheckpoint();
                if (s.Recipe.SampleEvery > 0 && s.StepsDone % s.Recipe.SampleEvery == 0 && s.StepsDone < _run.TargetStep)
                    SampleNow(stoppingToken);
            }
            if (_options.SampleOnly)
            {
                SetState(RunState.Serving);
                _log.LogInformation("Serving samples from the weights of step {Step} (no training)", s.StepsDone);
            }
            else
            {
                if (_lastCheckpointStep != s.StepsDone) await SaveFinalCheckpointAsync(stoppingToken);
                // The final picture, as `coordinator train` writes one, before the workers are let go.
                if (_samples is not null && s.Recipe.SampleEvery > 0)
                {
                    await _samples.Running;
                    if (!File.Exists(PeriodicSamples.PathFor(_run.RunDir, s.StepsDone))) SampleNow(stoppingToken);
                    await _samples.Running;
                }
                SetState(RunState.Complete);
                _log.LogInformation("Training complete at step {Step}", s.StepsDone);
            }
            _completion.TrySetResult();
            if (!_options.KeepServing && !_options.SampleOnly)
            {
                foreach (var w in _workers.Connected) w.Send(new CoordinatorMessage { Finish = new Finish { Reason = "training complete", Reconnect = false } });
                await Task.Delay(200, CancellationToken.None);   // let the finish messages go out before the host stops
                _lifetime.StopApplication();
            }
            else
            {
                // Keep the workers for sampling; answer joins and departures.
                while (!stoppingToken.IsCancellationRequested)
                {
                    await HandleNextAsync(TimeSpan.FromSeconds(1), stoppingToken);
                    _workers.Admit(_run.State.StepsDone);
                }
            }
        }
        catch (OperationCanceledException) when (stoppingToken.IsCancellationRequested)
        {
            // Shutdown (Ctrl+C, SIGTERM): keep the last completed step.
            if (_lastCheckpointStep != s.StepsDone && !_options.SampleOnly) SaveCheckpoint();
            foreach (var w in _workers.Connected) w.Send(new CoordinatorMessage { Finish = new Finish { Reason = "coordinator shutting down", Reconnect = true } });
            _completion.TrySetCanceled(stoppingToken);
        }
        catch (TrainingDivergedException e)
        {
            _log.LogError("{Reason}; stopping", e.Message);
            Stop(e);
        }
        catch (Exception e)
        {
            _log.LogError(e, "Training loop failed at step {Step}", s.StepsDone);
            Stop(e);
            throw;
        }
    }

    /// <summary>
    /// The loop cannot go on: checkpoint the last completed step (unless one exists, or an update was half-applied),
    /// tell the workers not to come back, and stop the process (exit code 1).
    /// </summary>
    private void Stop(Exception e)
    {
        var s = _run.State;
        SetState(RunState.Failed);
        if (!_options.SampleOnly && _lastCheckpointStep != s.StepsDone)
        {
            if (!_stateConsistent)
                _log.LogError("No checkpoint of step {Step}: the failure interrupted its update; the last checkpoint is {Folder}", s.StepsDone, _lastCheckpoint);
            else
            {
                try
                {
                    SaveCheckpoint();
                }
#pragma warning disable CA1031 // a failed final checkpoint while stopping is logged; the previous one stays valid
                catch (Exception saveError)
#pragma warning restore CA1031
                {
                    _log.LogError(saveError, "Could not checkpoint step {Step} while stopping; the last checkpoint is {Folder}", s.StepsDone, _lastCheckpoint);
                }
            }
        }
        foreach (var w in _workers.Connected) w.Send(new CoordinatorMessage { Finish = new Finish { Reason = "coordinator stopped: " + e.Message, Reconnect = false } });
        _completion.TrySetException(e);
        _lifetime.StopApplication();
    }

    /// <summary>Pins the current weights (EMA when kept) and has the workers sample them while training goes on.</summary>
    private void SampleNow(CancellationToken ct)
    {
        if (_samples is null) return;
        WeightsSnapshot snapshot;
        using (Model.TorchRuntime.Compute())
        {
            _run.State.FlushEma();
            snapshot = _parameters.Snapshot(true, (ulong)_run.State.StepsDone);
        }
        _samples.Start(snapshot, _run.State.StepsDone, ct);
    }

    /// <summary>A line in OUT/metrics.jsonl and the loss in the log, every --log-every steps.</summary>
    private void Record(StepSplit split, double norm)
    {
        var s = _run.State;
        var (loss, rate) = _interval.Take();
        var live = _workers.Live.Count;
        _log.LogInformation("Step {Step} of {Target}: loss {Loss:G4}, gradient norm {Norm:G4}, {Rate:F0} samples/s, {Workers} workers; step time {Compute:F3} s compute, {Exchange:F3} s exchange, {Update:F3} s update",
            s.StepsDone, _run.TargetStep, loss, norm, rate, live, split.ComputeSeconds, split.ExchangeSeconds, split.UpdateSeconds);
        try
        {
            _journal.Append(new Observe.StepRecord(s.StepsDone, s.Cursor.Epoch, loss, norm, s.Optimizer.LearningRateAt(s.StepsDone), rate, live,
                split.ComputeSeconds, split.ExchangeSeconds, split.UpdateSeconds));
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            _log.LogWarning(e, "Could not append to {Path}", _journal.Path);
        }
    }

    private void SetState(RunState state)
    {
        lock (_statusLock) _state = state;
    }

    /// <summary>
    /// The worker's stream handler has ended (it posts this last): remove the worker, and unmap its shared memory, which
    /// nobody reads any more (the handler copied gradients out of it; only this loop wrote parameters into it).
    /// </summary>
    private void Gone(WorkerGone g)
    {
        _workers.Remove(g.Worker, g.Reason);
        var segment = g.Worker.SharedMemory;
        g.Worker.SharedMemory = null;
        segment?.Dispose();
    }

    /// <summary>Waits up to <paramref name="timeout"/> for one event and handles joins and departures (outside a step).</summary>
    private async Task HandleNextAsync(TimeSpan timeout, CancellationToken ct)
    {
        var e = await NextEventAsync(timeout, ct);
        switch (e)
        {
            case WorkerJoined j: _workers.Register(j.Worker); break;
            case WorkerGone g: Gone(g); break;
            case GradientArrived a:
                Answered(a.Gradient.Worker, a.Gradient.Step, a.Gradient.Slice);
                Ack(a.Gradient, applied: false, "no step in progress");
                GradientBuffers.Return(a.Gradient.Values);
                break;
            case DuplicateSeen d:
                Answered(d.Worker, d.Step, d.Slice);
                break;
            case WeightsRequested w: Serve(w); break;
        }
    }

    private async Task<LoopEvent?> NextEventAsync(TimeSpan timeout, CancellationToken ct)
    {
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        cts.CancelAfter(timeout);
        try
        {
            return await _events.Reader.ReadAsync(cts.Token);
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
            return null;
        }
    }

    private async Task<(double Loss, double Norm)> RunStepAsync(CancellationToken ct)
    {
        var planning = Stopwatch.GetTimestamp();
        _stepCompute = 0;
        var s = _run.State;
        var plan = s.PlanStep();
        var keys = s.Step.SampleKeys(plan.Step, plan.Indices, plan.Epochs);
        // A worker still busy with a slice a backup took from it sits this step out (while others can do the work).
        // ... and a worker that straggled sits out 2, 4, 8, ... steps (up to 256) before it is tried again, so a worker
        // that stays slow costs a wait ever more rarely; one that answers a slice on time starts over.
        var eligible = _workers.Live.Where(w => !w.Straggling && (ulong)plan.Step >= w.SitOutUntilStep).ToList();
        if (eligible.Count == 0) eligible = _workers.Live.ToList();
        var round = new StepRound((ulong)plan.Step, _parameters.Version, _tree, Math.Min(eligible.Count, _tree.Leaves), TimeSpan.FromSeconds(_options.StepDeadlineSeconds), TimeProvider.System);
        for (var i = 0; i < round.Parts.Length; i++)
            foreach (var k in round.Parts[i]) Assign(k, eligible[i]);
        Verify();
        // The previous step's EMA update, while the workers compute this one.
        using (Model.TorchRuntime.Compute()) s.FlushEma();
        _busySeconds += Stopwatch.GetElapsedTime(planning).TotalSeconds;

        while (!round.IsComplete)
        {
            // Short waits once a slice is in: the stragglers' check below needs a clock, not an event.
            var e = await NextEventAsync(TimeSpan.FromMilliseconds(round.Snapshot().Done.Any(d => d) ? 10 : 500), ct);
            switch (e)
            {
                case WorkerJoined j:
                    _workers.Register(j.Worker);
                    break;
                case WorkerGone g:
                    Gone(g);
                    Reassign(g.Worker);
                    break;
                case WeightsRequested w:
                    Serve(w);
                    break;
                case DuplicateSeen d:
                    Answered(d.Worker, d.Step, d.Slice);
                    if (d.Checksum is { } sum) Compare(d.Worker, d.Step, d.Slice, sum);
                    break;
                case GradientArrived { Gradient: var gr }:
                    Answered(gr.Worker, gr.Step, gr.Slice);
                    if (round.Validate(gr) is not SliceRejection.None and var why)
                    {
                        if (why == SliceRejection.Duplicate) Compare(gr.Worker, gr.Step, gr.Slice, gr.Checksum);
                        Ack(gr, applied: false, why == SliceRejection.Duplicate ? "duplicate" : "stale");
                        GradientBuffers.Return(gr.Values);
                        break;
                    }
                    if (!Judge(gr)) break;
                    round.Accept(gr);
                    _stepCompute = Math.Max(_stepCompute, gr.ComputeSeconds);
                    _results.Record(gr.Step, gr.Slice, gr.Checksum, gr.Worker.Id);
                    gr.Worker.CompletedSlice(gr.Step, gr.ComputeSeconds);
                    if (!round.HadBackup((int)gr.Slice)) gr.Worker.Straggles = 0;   // on time: no more sitting out
                    if (round.Unfinished(gr.Worker).Count == 0) gr.Worker.State = WorkerState.Idle;
                    Ack(gr, applied: true, "");
                    _current = round.Snapshot();
                    break;
            }
            foreach (var w in _workers.Live.ToList())
            {
                var late = round.IsLate(w);
                if (late || w.SecondsSinceSeen > _options.HeartbeatTimeoutSeconds)
                {
                    var why = late ? $"missed the step deadline ({round.Deadline.TotalSeconds:F0} s) of step {round.Step}" : $"silent for {w.SecondsSinceSeen:F0} s (heartbeat every {_options.HeartbeatSeconds} s)";
                    w.Abort(StatusCode.DeadlineExceeded, why);
                    _workers.Remove(w, why);
                    Reassign(w);
                }
            }
            BackUpStragglers();
            if (_workers.Live.Count == 0 && !round.IsComplete)
            {
                SetState(RunState.WaitingForWorkers);
                if (_workers.AnyJoining)
                {
                    _workers.Admit(_run.State.StepsDone);
                    foreach (var orphan in round.Orphans(_workers.Live)) Assign(orphan, round.LeastLoaded(_workers.Live));
                    SetState(RunState.Training);
                }
            }
        }

        var (total, present, loss) = round.Sum(GradientBuffers.Return);
        var gathered = Stopwatch.GetTimestamp();
        double norm;
        using (Model.TorchRuntime.Compute())   // other threads allocate: torch temporaries must outlive their native calls
        {
            _vector.WriteGradients(total, present);
            GradientBuffers.Return(total);
            _stateConsistent = false;
            try
            {
                norm = s.ApplyGradients(plan, deferEma: true);
            }
            catch (NonFiniteGradientException e)
            {
                _stateConsistent = true;   // refused before any tensor changed
                throw new TrainingDivergedException($"training diverged at step {plan.Step}: the summed gradient of every slice is not finite ({e.Message})");
            }
            _stateConsistent = true;
            lock (_statusLock) _parameters.Publish(_parameters.Version + 1, (ulong)s.StepsDone);
        }
        if (_options.SampleLedger is { } ledger)
            File.AppendAllText(ledger, System.Text.Json.JsonSerializer.Serialize(new { step = plan.Step, indices = plan.Indices, epochs = plan.Epochs }) + "\n");
        var applying = Stopwatch.GetElapsedTime(gathered);
        _busySeconds += applying.TotalSeconds;
        _log.LogDebug("Step {Step} applied in {Ms:F1} ms after the last gradient", plan.Step, applying.TotalMilliseconds);
        _current = null;
        return (loss, norm);

        void Assign(int slice, WorkerConnection w)
        {
            round.Assign(slice, w);
            w.State = WorkerState.Busy;
            w.Outstanding.Add((round.Step, (uint)slice));
            if (w.ParameterVersion != _parameters.Version) _parameters.SendTo(w);
            var (start, end) = round.Bounds(slice);
            var node = round.NodeOf(slice);
            var assignment = new StepAssignment
            {
                Step = round.Step,
                ParameterVersion = _parameters.Version,
                Slice = (uint)slice,
                GlobalBatchSize = (uint)s.Recipe.BatchSize,
                FirstMicroBatch = (uint)node.First,
                EndMicroBatch = (uint)node.End,
            };
            assignment.Indices.Add(plan.Indices[start..end]);
            assignment.SampleSeeds.Add(keys[start..end]);
            // Published before the assignment goes out: a worker that answers at once (nothing to compute, a fast link)
            // has its gradient header checked against this snapshot, and would otherwise be refused as "not in progress".
            _current = round.Snapshot();
            w.Send(new CoordinatorMessage { Assignment = assignment });
        }

        // A slow slice (next to this step's others) gets a copy on an idle worker, or its two halves on two.
        void BackUpStragglers()
        {
            foreach (var k in round.Straggling(_options.StragglerFactor, TimeSpan.FromSeconds(_options.StragglerMinimumSeconds)))
            {
                var holders = round.HoldersOf(k).ToList();
                var idle = _workers.Live.Where(w => !w.Straggling && !holders.Contains(w) && round.Unfinished(w).Count == 0 && w.Outstanding.Count == 0).ToList();
                if (idle.Count == 0) return;
                foreach (var h in holders)
                {
                    h.Straggling = true;
                    h.Straggles = Math.Min(h.Straggles + 1, 8);
                    h.SitOutUntilStep = round.Step + (1ul << h.Straggles);
                }
                Interlocked.Increment(ref _backups);
                var node = round.NodeOf(k);
                if (idle.Count >= 2 && !node.IsLeaf)
                {
                    var (l, r) = round.Split(k);
                    Assign(l, idle[0]);
                    Assign(r, idle[1]);
                    _log.LogInformation("Step {Step} slice {Slice} ({Node}) is slow on {Holder}: its halves go to {Left} and {Right}", round.Step, k, node, holders[0].Id, idle[0].Id, idle[1].Id);
                }
                else
                {
                    Assign(k, idle[0]);
                    _log.LogInformation("Step {Step} slice {Slice} ({Node}) is slow on {Holder}: a copy goes to {Backup}", round.Step, k, node, holders[0].Id, idle[0].Id);
                }
            }
        }

        // --verify-fraction: a random share of the slices is also computed by a second worker; the bits must agree.
        void Verify()
        {
            if (_options.VerifyFraction <= 0 || eligible.Count < 2) return;
            var random = new Random(unchecked((int)SeedMix.Mix(s.Recipe.Seed, plan.Step, 0x5EF1)));
            for (var i = 0; i < round.Parts.Length; i++)
                foreach (var k in round.Parts[i])
                    if (random.NextDouble() < _options.VerifyFraction)
                        Assign(k, eligible[(i + 1 + random.Next(eligible.Count - 1)) % eligible.Count]);
        }

        // The slice guard's verdict on a valid push: true to take it into the step. A refused slice drops its worker (the
        // slice is recomputed elsewhere); a second, independent refusal of the same slice means the values are real.
        bool Judge(SliceGradient gr)
        {
            var (start, end) = round.Bounds((int)gr.Slice);
            var fault = _guard.Check(gr.SumOfSquares, end - start, s.Recipe.BatchSize, out var reason);
            if (fault == SliceFault.None)
            {
                _guard.Accepted(gr.SumOfSquares, end - start, s.Recipe.BatchSize);
                return true;
            }
            var agreeing = round.Refuse((int)gr.Slice, gr.Worker, fault);
            if (agreeing >= 2 && fault == SliceFault.NonFinite)
            {
                GradientBuffers.Return(gr.Values);
                throw new TrainingDivergedException($"training diverged at step {round.Step}: {agreeing} workers computed a non-finite gradient for slice {gr.Slice}");
            }
            if (agreeing >= 2)
            {
                _log.LogWarning("Step {Step} slice {Slice}: {Reason}, and {Count} workers agree: taken as a real gradient spike", round.Step, gr.Slice, reason, agreeing);
                return true;
            }
            GradientBuffers.Return(gr.Values);
            var detail = $"gradient of step {round.Step} slice {gr.Slice} refused: {reason}; the slice is recomputed on another worker";
            _log.LogWarning("Worker {Worker} dropped: {Detail}", gr.Worker.Id, detail);
            Ack(gr, applied: false, detail);
            Drop(gr.Worker, StatusCode.InvalidArgument, detail);
            return false;
        }

        void Drop(WorkerConnection w, StatusCode code, string detail)
        {
            w.Abort(code, detail);
            _workers.Remove(w, detail);
            Reassign(w);
        }

        // The bits of two computations of one slice must agree; a worker whose bits differ is counted (and dropped after
        // --max-disagreements): a silent-data-corruption signal.
        void Compare(WorkerConnection w, ulong step, uint slice, ulong checksum)
        {
            if (_results.Lookup(step, slice) is not { } first) return;
            Interlocked.Increment(ref _compared);
            if (first.Checksum == checksum) return;
            var count = w.Disagree();
            _log.LogWarning("Worker {Worker} computed step {Step} slice {Slice} with other bits than {First} (checksum {Theirs:x16} vs {Ours:x16}); {Count} disagreements",
                w.Id, step, slice, first.Worker, checksum, first.Checksum, count);
            if (count >= _options.MaxDisagreements && _workers.Live.Contains(w))
                Drop(w, StatusCode.DataLoss, $"computed {count} slices with other bits than other workers (last: step {step} slice {slice})");
        }

        void Reassign(WorkerConnection gone)
        {
            foreach (var k in round.Drop(gone))
            {
                if (_workers.Live.Count == 0)
                {
                    _log.LogWarning("Step {Step} slice {Slice} waits for a worker", round.Step, k);
                    continue;
                }
                var to = round.LeastLoaded(_workers.Live);
                _log.LogInformation("Step {Step} slice {Slice} ({Samples} samples) of {Gone} goes to {Worker}", round.Step, k, round.Bounds(k).End - round.Bounds(k).Start, gone.Id, to.Id);
                Assign(k, to);
            }
            _current = round.Snapshot();
        }
    }

    /// <summary>A push (taken, refused or ignored) answers an assignment: the worker is no longer behind on it.</summary>
    private static void Answered(WorkerConnection w, ulong step, uint slice)
    {
        w.Outstanding.Remove((step, slice));
        if (w.Outstanding.Count == 0) w.Straggling = false;
    }

    private static void Ack(SliceGradient g, bool applied, string note) =>
        g.Worker.Send(new CoordinatorMessage { Ack = new Ack { Step = g.Step, Slice = g.Slice, Applied = applied, Note = note } });

    /// <summary>
    /// Writes and verifies a checkpoint of the current step, then applies the retention. A checkpoint the disk refuses
    /// (full, I/O error) is logged and training goes on; the next interval tries again. The status fields move only on success.
    /// </summary>
    private bool SaveCheckpoint()
    {
        var step = _run.State.StepsDone;
        SavedCheckpoint saved;
        try
        {
            using var guard = Model.TorchRuntime.Compute();
            saved = CheckpointStore.Write(_run.RunDir, _run.State.ToCheckpoint(), _run.Retention);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            string last;
            long lastStep;
            lock (_statusLock) (last, lastStep) = (_lastCheckpoint, _lastCheckpointStep);
            _log.LogError(e, "Checkpoint of step {Step} not written; training goes on and the next checkpoint tries again (last checkpoint {LastCheckpoint}, step {LastStep})",
                step, last.Length > 0 ? last : "none", lastStep);
            return false;
        }
        lock (_statusLock) (_lastCheckpoint, _lastCheckpointStep, _lastCheckpointAt) = (saved.Folder, saved.Step, Stopwatch.GetTimestamp());
        try
        {
            _journal.WriteLossPlot(_run.State.Recipe.Name);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            _log.LogWarning(e, "Could not write {Path}", _journal.LossPlotPath);
        }
        foreach (var aside in saved.SetAside)
            _log.LogWarning("{Folder} was not a valid checkpoint ({Reason}); moved it to {MovedTo}", aside.Folder, aside.Reason, aside.MovedTo);
        _log.LogInformation("Checkpoint {Folder}", saved.Folder);
        foreach (var gone in saved.Deleted)
            _log.LogInformation("Deleted checkpoint {Folder} (retention: {Retention})", gone, _run.Retention);
        foreach (var problem in saved.PruneProblems)
            _log.LogWarning("Could not delete an old checkpoint: {Problem}", problem);
        return true;
    }

    /// <summary>The checkpoint at the end of training, tried 3 times (1 s, then 2 s apart); then an IOException fails the run.</summary>
    private async Task SaveFinalCheckpointAsync(CancellationToken ct)
    {
        const int attempts = 3;
        var pause = TimeSpan.FromSeconds(1);
        for (var attempt = 1; attempt <= attempts; attempt++)
        {
            if (SaveCheckpoint()) return;
            if (attempt == attempts) break;
            await Task.Delay(pause, ct);
            pause *= 2;
        }
        throw new IOException($"the final checkpoint of step {_run.State.StepsDone} could not be written in {attempts} attempts; the last checkpoint is "
            + (_lastCheckpointStep < 0 ? "none" : $"{_lastCheckpoint} (step {_lastCheckpointStep})"));
    }

    public override void Dispose()
    {
        _completion.TrySetCanceled();
        base.Dispose();
    }
}
