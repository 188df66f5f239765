using DistDiffusion.Coordinator.Observe;
using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;

namespace DistDiffusion.Coordinator.Training;

/// <summary>What the status calls, the dashboard, /metrics, the tests and the benchmark read of the loop (from other threads).</summary>
public sealed partial class TrainingLoop
{
    /// <summary>OUT/metrics.jsonl and OUT/loss.png.</summary>
    public MetricsJournal Journal => _journal;

    public Telemetry ReadTelemetry() => _status.ReadTelemetry();

    /// <summary>What a joining worker is told about the run (the Welcome), fixed for the loop's life.</summary>
    public RunDescription Description { get; }
    /// <summary>Where the stream handlers receive gradients; the loop returns each buffer once summed.</summary>
    public TensorBufferPool GradientBuffers { get; }
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

    public StatusReply Status()
    {
        var s = _run.State;
        var reply = new StatusReply
        {
            Recipe = s.Recipe.Name,
            RecipeJson = Description.RecipeJson,
            TargetStep = (ulong)_run.TargetStep,
            RunId = Description.RunId,
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
}
