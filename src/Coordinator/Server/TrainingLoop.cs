using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Threading.Channels;
using DistDiffusion.Model;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Optimization;
using DistDiffusion.Model.Training;
using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;
using Grpc.Core;
using Microsoft.Extensions.Logging;

namespace DistDiffusion.Coordinator.Server;

/// <summary>
/// A finished slice gradient, decoded and checksum-verified by the stream handler, with its sum of squares in double
/// (non-finite when an element is) for the loop's <see cref="SliceGuard"/>, and the checksum of its bytes as sent (null
/// when they came through shared memory, which is checked by its write sequence: the loop hashes its copy when a
/// comparison needs one).
/// </summary>
internal sealed record SliceGradient(WorkerConnection Worker, ulong Step, uint Slice, float[] Values, byte[] Present, double Loss, double ComputeSeconds, double SumOfSquares, ulong? Checksum);

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
/// All torch work happens on this loop, one event at a time (it may continue on the handler thread that posted the
/// event it waited for); handlers only decode and validate bytes.
/// </summary>
public sealed class TrainingLoop : BackgroundService
{
    private readonly RunSetup _run;
    private readonly CoordinatorOptions _options;
    private readonly ILogger<TrainingLoop> _log;
    private readonly IHostApplicationLifetime _lifetime;
    // The loop reads alone, and continues on the thread that posts to it: the handler that completes a step's last
    // gradient runs the update and sends the next parameters itself instead of waking another (on an idle core of a
    // VM, waking a thread costs ~0.1 ms of a ~6 ms step). NextEventAsync leaves a timer's thread at once.
    private readonly Channel<LoopEvent> _events = Channel.CreateUnbounded<LoopEvent>(new UnboundedChannelOptions { SingleReader = true, AllowSynchronousContinuations = true });
    private readonly ParameterVector _vector;
    private readonly WorkerRoster _workers;
    private readonly RunStatus _status;
    private readonly ParameterBroadcast _parameters;
    private readonly SliceGuard _guard;
    private readonly MicroBatchTree _tree;
    private readonly StepCounters _counters = new();
    private readonly StepServices _stepServices;
    /// <summary>False only while an update is being applied: a checkpoint taken then would mix two steps.</summary>
    private bool _stateConsistent = true;
    private volatile StepSnapshot? _current;
    private readonly Observe.MetricsJournal _journal;
    private readonly Observe.StepInterval _interval = new();

    private readonly PeriodicSamples? _samples;

    public TrainingLoop(RunSetup run, CoordinatorOptions options, ILogger<TrainingLoop> log, IHostApplicationLifetime lifetime, PeriodicSamples? samples = null, Observe.TensorBoardSink? tensorBoard = null)
    {
        _samples = samples;
        _run = run;
        _options = options;
        _log = log;
        _lifetime = lifetime;
        // The checkpoint this state came from (not merely the highest step folder, which may be the damaged one skipped).
        _status = new RunStatus(run.LastCheckpoint);
        _workers = new WorkerRoster(_status.Gate, log);
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
        _journal = new Observe.MetricsJournal(run.RunDir, tensorBoard);
        _stepServices = new StepServices(_workers, _parameters, options, _guard, _tree, new RecentResults(), GradientBuffers, _status, _counters, log,
            NextEventAsync, Serve, Gone, snapshot => _current = snapshot);
    }

    /// <summary>OUT/metrics.jsonl and OUT/loss.png.</summary>
    public Observe.MetricsJournal Journal => _journal;

    public Telemetry ReadTelemetry() => _status.ReadTelemetry();

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
    /// Seconds the loop spent on its own work (planning, summing the slices, Adam, the EMA) rather than on the exchange
    /// (handing parameters to the workers' streams or regions, taking their gradients) or waiting for workers: the
    /// benchmark subtracts it to isolate the exchange itself.
    /// </summary>
    public double BusySeconds => Volatile.Read(ref _busySeconds);
    private double _busySeconds;
    /// <summary>Slow slices given a copy (or their halves) on idle workers so far.</summary>
    public long BackupsIssued => _counters.BackupsIssued;
    /// <summary>Second results (straggler copies, verifications) whose bits were compared with the first.</summary>
    public long ResultsCompared => _counters.ResultsCompared;
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

    public Recipe Recipe => _run.State.Recipe;

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
        lock (_status.Gate)
        {
            reply.Step = (ulong)s.StepsDone;
            reply.Epoch = s.Cursor.Epoch;
            reply.ParameterVersion = _parameters.Version;
            _status.FillUnderGate(reply);
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
                    _status.SetState(RunState.WaitingForWorkers);
                    if (!waitingLogged) _log.LogWarning("Waiting for workers: {Live} of {Needed} live (step {Step} of {Target})", _workers.Live.Count, needed, s.StepsDone, _run.TargetStep);
                    waitingLogged = true;
                    await HandleNextAsync(TimeSpan.FromSeconds(1), stoppingToken);
                    continue;
                }
                waitingLogged = false;
                started = true;
                _status.SetState(RunState.Training);
                clock.Restart();
                var busyBefore = _busySeconds;
                var (loss, norm, slowestCompute) = await RunStepAsync(stoppingToken);
                var seconds = clock.Elapsed.TotalSeconds;
                var update = Math.Min(seconds, _busySeconds - busyBefore);
                var compute = Math.Clamp(slowestCompute, 0, seconds - update);
                var split = new StepSplit(compute, Math.Max(0, seconds - update - compute), update);
                _status.StepDone(loss, norm, split, s.Recipe.BatchSize, seconds);
                _log.LogDebug("Step {Step}: loss {Loss:G4}, gradient norm {Norm:G4}, {Seconds:F3} s over {Workers} workers", s.StepsDone, loss, norm, seconds, _workers.Live.Count);
                _interval.Add(loss, s.Recipe.BatchSize);
                if (s.StepsDone % _options.LogEvery == 0 || s.StepsDone == _run.TargetStep) Record(split, norm);
                var checkpointDue = s.Recipe.CheckpointEvery > 0 && s.StepsDone % s.Recipe.CheckpointEvery == 0 && s.StepsDone < _run.TargetStep;
                var sampleDue = s.Recipe.SampleEvery > 0 && s.StepsDone % s.Recipe.SampleEvery == 0 && s.StepsDone < _run.TargetStep;
                // The loop may be running on the thread that posted the step's last gradient, a connection's I/O thread:
                // a checkpoint's disk writes and a snapshot's copies move to the thread pool first.
                if (checkpointDue || sampleDue) await Task.Yield();
                if (checkpointDue) SaveCheckpoint();
                if (sampleDue) SampleNow(stoppingToken);
            }
            if (_options.SampleOnly)
            {
                _status.SetState(RunState.Serving);
                _log.LogInformation("Serving samples from the weights of step {Step} (no training)", s.StepsDone);
            }
            else
            {
                if (_status.LastCheckpoint.Step != s.StepsDone) await SaveFinalCheckpointAsync(stoppingToken);
                // The final picture, as `coordinator train` writes one, before the workers are let go.
                if (_samples is not null && s.Recipe.SampleEvery > 0)
                {
                    await _samples.Running;
                    if (!File.Exists(PeriodicSamples.PathFor(_run.RunDir, s.StepsDone))) SampleNow(stoppingToken);
                    await _samples.Running;
                }
                _status.SetState(RunState.Complete);
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
            if (_status.LastCheckpoint.Step != s.StepsDone && !_options.SampleOnly) SaveCheckpoint();
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
        _status.SetState(RunState.Failed);
        if (!_options.SampleOnly && _status.LastCheckpoint.Step != s.StepsDone)
        {
            if (!_stateConsistent)
                _log.LogError("No checkpoint of step {Step}: the failure interrupted its update; the last checkpoint is {LastCheckpoint}", s.StepsDone, _status.DescribeLastCheckpoint());
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
                    _log.LogError(saveError, "Could not checkpoint step {Step} while stopping; the last checkpoint is {LastCheckpoint}", s.StepsDone, _status.DescribeLastCheckpoint());
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
                StepDriver.Answered(a.Gradient.Worker, a.Gradient.Step, a.Gradient.Slice);
                StepDriver.Ack(a.Gradient, applied: false, "no step in progress");
                GradientBuffers.Return(a.Gradient.Values);
                break;
            case DuplicateSeen d:
                StepDriver.Answered(d.Worker, d.Step, d.Slice);
                break;
            case WeightsRequested w: Serve(w); break;
        }
    }

    private async Task<LoopEvent?> NextEventAsync(TimeSpan timeout, CancellationToken ct)
    {
        if (_events.Reader.TryRead(out var ready)) return ready;   // no timer to set up and tear down
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        cts.CancelAfter(timeout);
        try
        {
            return await _events.Reader.ReadAsync(cts.Token);
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
            // The timeout's cancellation ran this continuation on the timer's thread: the loop goes on elsewhere.
            await Task.Yield();
            return null;
        }
    }

    /// <summary>
    /// One step: plan its batch, let a <see cref="StepDriver"/> hand out the slices and gather them (the previous step's
    /// EMA update runs meanwhile where it was deferred: the tensor-op path; the flat step on CPU updates the EMA in its own
    /// pass), then apply the summed gradient and publish the new parameters.
    /// </summary>
    private async Task<(double Loss, double Norm, double SlowestCompute)> RunStepAsync(CancellationToken ct)
    {
        // Busy time is the coordinator's own work (planning, the EMA, Adam), not handing parameters and assignments to the
        // workers' streams or regions: that is the exchange, which a socket write can do inline here.
        var planning = Stopwatch.GetTimestamp();
        var s = _run.State;
        var plan = s.PlanStep();
        _busySeconds += Stopwatch.GetElapsedTime(planning).TotalSeconds;
        StepTimeline.Mark(StepMark.Planned, (ulong)plan.Step);
        var driver = new StepDriver(_stepServices, s, plan);
        StepTimeline.Mark(StepMark.Assigned, (ulong)plan.Step);
        // The previous step's EMA update if it was deferred (the tensor-op path), while the workers compute this one.
        var flushing = Stopwatch.GetTimestamp();
        using (Model.TorchRuntime.Compute()) s.FlushEma();
        _busySeconds += Stopwatch.GetElapsedTime(flushing).TotalSeconds;

        var (total, present, loss) = await driver.RunAsync(ct);
        _busySeconds += driver.SummingSeconds;
        var gathered = Stopwatch.GetTimestamp();
        StepTimeline.Mark(StepMark.Summed, (ulong)plan.Step);
        double norm;
        using (Model.TorchRuntime.Compute())   // other threads allocate: torch temporaries must outlive their native calls
        {
            // Where the optimizer can, it reads the summed gradient where it is and writes the new parameters straight
            // into the broadcast's next buffer; otherwise (an accelerator, the tensor-op path) through .grad and back.
            var version = _parameters.Version + 1;
            var flat = s.Optimizer.CanStepFlat;
            if (!flat) _vector.WriteGradients(total, present);
            _stateConsistent = false;
            try
            {
                norm = flat
                    ? s.ApplyGradients(plan, total, present, MemoryMarshal.Cast<byte, float>(_parameters.BufferFor(version).AsSpan()))
                    : s.ApplyGradients(plan, deferEma: true);
            }
            catch (NonFiniteGradientException e)
            {
                _stateConsistent = true;   // refused before any tensor changed
                throw new TrainingDivergedException($"training diverged at step {plan.Step}: the summed gradient of every slice is not finite ({e.Message})");
            }
            finally
            {
                GradientBuffers.Return(total);
            }
            _stateConsistent = true;
            lock (_status.Gate)
            {
                if (flat) _parameters.Published(version, (ulong)s.StepsDone);
                else _parameters.Publish(version, (ulong)s.StepsDone);
            }
        }
        StepTimeline.Mark(StepMark.Applied, (ulong)plan.Step);
        if (_options.SampleLedger is { } ledger)
            File.AppendAllText(ledger, System.Text.Json.JsonSerializer.Serialize(new { step = plan.Step, indices = plan.Indices, epochs = plan.Epochs }) + "\n");
        var applying = Stopwatch.GetElapsedTime(gathered);
        _busySeconds += applying.TotalSeconds;
        _log.LogDebug("Step {Step} applied in {Ms:F1} ms after the last gradient", plan.Step, applying.TotalMilliseconds);
        _current = null;
        return (loss, norm, driver.SlowestCompute);
    }

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
            var (last, lastStep) = _status.LastCheckpoint;
            _log.LogError(e, "Checkpoint of step {Step} not written; training goes on and the next checkpoint tries again (last checkpoint {LastCheckpoint}, step {LastStep})",
                step, last.Length > 0 ? last : "none", lastStep);
            return false;
        }
        _status.CheckpointSaved(saved.Folder, saved.Step);
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
        throw new IOException($"the final checkpoint of step {_run.State.StepsDone} could not be written in {attempts} attempts; the last checkpoint is {_status.DescribeLastCheckpoint()}");
    }

    public override void Dispose()
    {
        _completion.TrySetCanceled();
        base.Dispose();
    }
}
