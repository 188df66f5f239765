using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Threading.Channels;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Observe;
using DistDiffusion.Coordinator.Sampling;
using DistDiffusion.Coordinator.Workers;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Optimization;
using DistDiffusion.Model.Training;
using DistDiffusion.Model;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Grpc.Core;
using Microsoft.Extensions.Logging;

namespace DistDiffusion.Coordinator.Training;

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
public sealed partial class TrainingLoop : BackgroundService, IStepHost
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
    private readonly StepParts _stepParts;
    /// <summary>False only while an update is being applied: a checkpoint taken then would mix two steps.</summary>
    private bool _stateConsistent = true;
    private volatile StepSnapshot? _current;
    private readonly MetricsJournal _journal;
    private readonly StepRecorder _recorder;
    private readonly CheckpointWriter _checkpoints;

    private readonly PeriodicSamples? _samples;

    public TrainingLoop(RunSetup run, CoordinatorOptions options, ILogger<TrainingLoop> log, IHostApplicationLifetime lifetime, PeriodicSamples? samples = null, TensorBoardSink? tensorBoard = null)
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
        Description = new RunDescription(Guid.NewGuid().ToString("N")[..12], run.State.Recipe, options.ParseGradientDtype(), _vector, run.TrainSize);
        _parameters.Publish((ulong)run.State.StepsDone, (ulong)run.State.StepsDone);
        _journal = new MetricsJournal(run.RunDir, tensorBoard);
        _checkpoints = new CheckpointWriter(run, _status, _journal, log);
        _recorder = new StepRecorder(run, _journal, log);
        _stepParts = new StepParts(_workers, _parameters, options, _guard, _tree, new RecentResults(), GradientBuffers, _status, _counters, log);
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
                Description.RunId, s.Recipe.Name, _vector.Elements, s.Recipe.BatchSize, s.StepsDone, _run.TargetStep, Description.GradientDtype);
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
                _recorder.Add(loss, s.Recipe.BatchSize);
                if (s.StepsDone % _options.LogEvery == 0 || s.StepsDone == _run.TargetStep) _recorder.Record(split, norm, _workers.Live.Count);
                var checkpointDue = s.Recipe.CheckpointEvery > 0 && s.StepsDone % s.Recipe.CheckpointEvery == 0 && s.StepsDone < _run.TargetStep;
                var sampleDue = s.Recipe.SampleEvery > 0 && s.StepsDone % s.Recipe.SampleEvery == 0 && s.StepsDone < _run.TargetStep;
                // The loop may be running on the thread that posted the step's last gradient, a connection's I/O thread:
                // a checkpoint's disk writes and a snapshot's copies move to the thread pool first.
                if (checkpointDue || sampleDue) await Task.Yield();
                if (checkpointDue) _checkpoints.Save();
                if (sampleDue) SampleNow(stoppingToken);
            }
            if (_options.SampleOnly)
            {
                _status.SetState(RunState.Serving);
                _log.LogInformation("Serving samples from the weights of step {Step} (no training)", s.StepsDone);
            }
            else
            {
                if (_status.LastCheckpoint.Step != s.StepsDone) await _checkpoints.SaveFinalAsync(stoppingToken);
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
            if (_status.LastCheckpoint.Step != s.StepsDone && !_options.SampleOnly) _checkpoints.Save();
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
                    _checkpoints.Save();
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
        var driver = new StepDriver(_stepParts, this, s, plan);
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

    public override void Dispose()
    {
        _completion.TrySetCanceled();
        base.Dispose();
    }
}
