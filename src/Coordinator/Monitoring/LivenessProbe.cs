using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Sampling;
using DistDiffusion.Coordinator.Training;
using DistDiffusion.Protocol.V1;
using Grpc.Health.V1;
using Grpc.HealthCheck;
using Microsoft.Extensions.Logging;

namespace DistDiffusion.Coordinator.Monitoring;

/// <summary>
/// The health service "distdiffusion.liveness" (grpc.health.v1, on the main port and on --health-listen's): SERVING
/// while a <see cref="LivenessWatch"/> over the training loop says alive, NOT_SERVING once training with live workers
/// has made no progress for --liveness-timeout (a Kubernetes liveness probe naming this service then restarts the
/// coordinator, which resumes from its last checkpoint). The overall service "" keeps answering SERVING meanwhile, so a
/// readiness probe on it does not take the coordinator out of its Service. The loop is read off the probe's own thread,
/// one read at a time: a read that hangs leaves the last reading standing, whose clock keeps running.
/// </summary>
public sealed class LivenessProbe(TrainingLoop loop, SamplingCoordinator sampling, HealthServiceImpl health, CoordinatorOptions options, ILogger<LivenessProbe> log)
    : BackgroundService
{
    public const string ServiceName = "distdiffusion.liveness";

    /// <summary>How often the loop is read and the status set: a tenth of the timeout, between 0.1 and 5 s.</summary>
    public static TimeSpan Period(TimeSpan timeout) => TimeSpan.FromSeconds(Math.Clamp(timeout.TotalSeconds / 10, 0.1, 5));

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        var watch = new LivenessWatch(TimeSpan.FromSeconds(options.LivenessTimeoutSeconds), options.SampleOnly, TimeProvider.System);
        health.SetStatus(ServiceName, HealthCheckResponse.Types.ServingStatus.Serving);
        if (options.LivenessTimeoutSeconds > 0 && options.LivenessTimeoutSeconds <= options.StepDeadlineSeconds && !options.SampleOnly)
            log.LogWarning("--liveness-timeout {Timeout} s is not longer than --step-deadline {Deadline} s: a worker that stops answering fails the liveness check before the deadline drops it and training goes on without it",
                options.LivenessTimeoutSeconds, options.StepDeadlineSeconds);
        var period = Period(watch.Timeout);
        var alive = true;
        Task<LoopReading>? reading = null;
        try
        {
            while (!stoppingToken.IsCancellationRequested)
            {
                reading ??= Task.Run(Read, CancellationToken.None);
                await Task.Delay(period, stoppingToken);
                if (reading.IsCompleted)
                {
                    if (reading.IsCompletedSuccessfully) watch.Observe(reading.Result);
                    else log.LogWarning(reading.Exception, "Liveness: reading the training loop's status failed");
                    reading = null;
                }
                var verdict = watch.Verdict();
                if (verdict.Alive == alive) continue;
                alive = verdict.Alive;
                if (alive) log.LogInformation("Liveness: SERVING again ({Reason})", verdict.Reason);
                else log.LogError("Liveness: NOT_SERVING on {Service}: {Reason}", ServiceName, verdict.Reason);
                health.SetStatus(ServiceName, alive ? HealthCheckResponse.Types.ServingStatus.Serving : HealthCheckResponse.Types.ServingStatus.NotServing);
            }
        }
        catch (OperationCanceledException) when (stoppingToken.IsCancellationRequested)
        {
            // shutting down
        }
        health.SetStatus(ServiceName, HealthCheckResponse.Types.ServingStatus.NotServing);
    }

    private LoopReading Read()
    {
        var status = loop.Status();
        var live = status.Workers.Count(w => w.State is WorkerState.Idle or WorkerState.Busy);
        var sampled = sampling.Jobs().Sum(j => (long)j.Forwarded + j.Held);
        return new LoopReading(status.State, live, (long)status.Step, sampled);
    }
}
