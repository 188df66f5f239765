using System.Diagnostics;
using DistDiffusion.Protocol.V1;

namespace DistDiffusion.Coordinator.Training;

/// <summary>How the last step's wall time divides: the slowest worker's computing, the rest of the wait, the coordinator's own work.</summary>
public readonly record struct StepSplit(double ComputeSeconds, double ExchangeSeconds, double UpdateSeconds);

/// <summary>What the metrics endpoint reads besides <see cref="TrainingLoop.Status"/>.</summary>
public readonly record struct Telemetry(double GradNorm, StepSplit LastStep, double? CheckpointAgeSeconds);

/// <summary>
/// What `coordinator status`, the dashboard and the metrics endpoint read about a run besides its step: the run's state,
/// the smoothed loss and throughput, the last step's split and gradient norm, the last checkpoint. The training loop
/// writes it; request threads read it. Every field moves under <see cref="Gate"/>, which the worker roster and the
/// parameter publication share, so one status reply describes one moment.
/// </summary>
internal sealed class RunStatus
{
    private RunState _state = RunState.WaitingForWorkers;
    private double _loss = double.NaN;
    private double _samplesPerSecond;
    private double _gradNorm = double.NaN;
    private StepSplit _lastSplit = new(0, 0, 0);
    private string _lastCheckpoint = "";
    private long _lastCheckpointStep = -1;
    private long _lastCheckpointAt;

    /// <param name="resumedFrom">The checkpoint the run's state was loaded from, if any (its age is unknown: not reported).</param>
    public RunStatus((string Folder, long Step)? resumedFrom)
    {
        if (resumedFrom is { } last) (_lastCheckpoint, _lastCheckpointStep) = (last.Folder, last.Step);
    }

    /// <summary>The lock every status field, the roster's worker list and the published parameter version move under.</summary>
    public object Gate { get; } = new();

    public void SetState(RunState state)
    {
        lock (Gate) _state = state;
    }

    /// <summary>
    /// A step finished: its loss and the samples per second go into moving averages (weight 0.1 for the newest step),
    /// its gradient norm and time split replace the last ones.
    /// </summary>
    public void StepDone(double loss, double gradNorm, StepSplit split, int batchSize, double seconds)
    {
        var rate = batchSize / Math.Max(seconds, 1e-9);
        lock (Gate)
        {
            _gradNorm = gradNorm;
            _lastSplit = split;
            _loss = double.IsNaN(_loss) ? loss : 0.9 * _loss + 0.1 * loss;
            _samplesPerSecond = _samplesPerSecond == 0 ? rate : 0.9 * _samplesPerSecond + 0.1 * rate;
        }
    }

    /// <summary>A checkpoint was written and verified now.</summary>
    public void CheckpointSaved(string folder, long step)
    {
        lock (Gate) (_lastCheckpoint, _lastCheckpointStep, _lastCheckpointAt) = (folder, step, Stopwatch.GetTimestamp());
    }

    /// <summary>The last checkpoint written or resumed from: its folder ("" for none) and step (-1 for none).</summary>
    public (string Folder, long Step) LastCheckpoint
    {
        get
        {
            lock (Gate) return (_lastCheckpoint, _lastCheckpointStep);
        }
    }

    /// <summary>The last checkpoint in words, for messages: "none", or its folder and step.</summary>
    public string DescribeLastCheckpoint()
    {
        var (folder, step) = LastCheckpoint;
        return step < 0 ? "none" : $"{folder} (step {step})";
    }

    public Telemetry ReadTelemetry()
    {
        lock (Gate)
            return new Telemetry(_gradNorm, _lastSplit, _lastCheckpointAt == 0 ? null : Stopwatch.GetElapsedTime(_lastCheckpointAt).TotalSeconds);
    }

    /// <summary>Writes the run's fields into <paramref name="reply"/>; the caller holds <see cref="Gate"/> while it adds the rest of the moment.</summary>
    public void FillUnderGate(StatusReply reply)
    {
        if (!Monitor.IsEntered(Gate)) throw new InvalidOperationException("RunStatus.FillUnderGate needs the caller to hold Gate");
        reply.State = _state;
        reply.Loss = _loss;
        reply.SamplesPerSecond = _samplesPerSecond;
        reply.LastCheckpoint = _lastCheckpoint;
        reply.LastCheckpointStep = _lastCheckpointStep < 0 ? 0 : (ulong)_lastCheckpointStep;
    }
}
