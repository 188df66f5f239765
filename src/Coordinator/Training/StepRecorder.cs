using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Observe;
using Microsoft.Extensions.Logging;

namespace DistDiffusion.Coordinator.Training;

/// <summary>
/// The loop's account of its steps: every step's loss and batch go into the running interval, and every --log-every
/// steps one log line and one line of OUT/metrics.jsonl carry the interval's mean loss and throughput with the last
/// step's split. A journal the disk refuses is logged and training goes on.
/// </summary>
internal sealed class StepRecorder(RunSetup run, MetricsJournal journal, ILogger log)
{
    private readonly StepInterval _interval = new();

    public void Add(double loss, int batchSize) => _interval.Add(loss, batchSize);

    /// <summary>A line in OUT/metrics.jsonl and the loss in the log, every --log-every steps.</summary>
    public void Record(StepSplit split, double norm, int live)
    {
        var s = run.State;
        var (loss, rate) = _interval.Take();
        log.LogInformation("Step {Step} of {Target}: loss {Loss:G4}, gradient norm {Norm:G4}, {Rate:F0} samples/s, {Workers} workers; step time {Compute:F3} s compute, {Exchange:F3} s exchange, {Update:F3} s update",
            s.StepsDone, run.TargetStep, loss, norm, rate, live, split.ComputeSeconds, split.ExchangeSeconds, split.UpdateSeconds);
        try
        {
            journal.Append(new StepRecord(s.StepsDone, s.Cursor.Epoch, loss, norm, s.Optimizer.LearningRateAt(s.StepsDone), rate, live,
                split.ComputeSeconds, split.ExchangeSeconds, split.UpdateSeconds));
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            log.LogWarning(e, "Could not append to {Path}", journal.Path);
        }
    }
}
