using System.Diagnostics.Metrics;
using DistDiffusion.Coordinator.Sampling;
using DistDiffusion.Coordinator.Training;
using DistDiffusion.Protocol.V1;
using OpenTelemetry.Metrics;

namespace DistDiffusion.Coordinator.Monitoring;

/// <summary>
/// The coordinator's System.Diagnostics.Metrics instruments, all observable: each scrape of GET /metrics reads the
/// training loop's status and telemetry and the sampling side's request count. OpenTelemetry's Prometheus exporter
/// names them distdiffusion_*; beside them go the runtime's (dotnet_*: GC, heap, JIT, thread pool, exceptions) and the
/// process's (process_*: CPU time, memory, threads) from OpenTelemetry's instrumentation packages.
/// </summary>
public sealed class CoordinatorMetrics : IDisposable
{
    public const string MeterName = "DistDiffusion.Coordinator";

    /// <summary>Everything GET /metrics exports: this class's meter, the runtime's and the process's instruments.</summary>
    public static MeterProviderBuilder Instruments(MeterProviderBuilder metrics) =>
        metrics.AddMeter(MeterName).AddRuntimeInstrumentation().AddProcessInstrumentation();

    private readonly Meter _meter;

    public CoordinatorMetrics(IMeterFactory factory, TrainingLoop loop, SamplingCoordinator sampling)
    {
        _meter = factory.Create(MeterName);
        _meter.CreateObservableCounter("distdiffusion.steps", () => loop.StepsDone, "{step}", "Training steps done");
        _meter.CreateObservableGauge("distdiffusion.target_steps", () => (long)loop.Status().TargetStep, "{step}", "The step training stops at");
        _meter.CreateObservableGauge("distdiffusion.loss", () => Finite(loop.Status().Loss), description: "Training loss (moving average over recent steps)");
        _meter.CreateObservableGauge("distdiffusion.samples_per_second", () => loop.Status().SamplesPerSecond, description: "Training samples per second (moving average)");
        _meter.CreateObservableGauge("distdiffusion.gradient_norm", () => Finite(loop.ReadTelemetry().GradNorm), description: "Norm of the last step's summed gradient (before clipping)");
        _meter.CreateObservableGauge("distdiffusion.step.duration", () =>
        {
            var split = loop.ReadTelemetry().LastStep;
            return new[]
            {
                new Measurement<double>(split.ComputeSeconds, new KeyValuePair<string, object?>("phase", "compute")),
                new Measurement<double>(split.ExchangeSeconds, new KeyValuePair<string, object?>("phase", "exchange")),
                new Measurement<double>(split.UpdateSeconds, new KeyValuePair<string, object?>("phase", "update")),
            };
        }, "s", "The last step's wall time by phase: the slowest worker's compute, the rest of the exchange, the coordinator's update");
        _meter.CreateObservableGauge("distdiffusion.worker.step.duration", () => Workers(loop).Select(w =>
            new Measurement<double>(w.MeanStepSeconds, new KeyValuePair<string, object?>("worker", w.Id))), "s", "Each worker's mean seconds per slice");
        _meter.CreateObservableCounter("distdiffusion.worker.transferred", () => Workers(loop).SelectMany(w => new[]
        {
            new Measurement<long>((long)w.BytesIn, new KeyValuePair<string, object?>("worker", w.Id), new KeyValuePair<string, object?>("direction", "in")),
            new Measurement<long>((long)w.BytesOut, new KeyValuePair<string, object?>("worker", w.Id), new KeyValuePair<string, object?>("direction", "out")),
        }), "By", "Bytes received from (in) and sent to (out) each worker");
        _meter.CreateObservableGauge("distdiffusion.workers.live", () => Workers(loop).Count(w => w.State is WorkerState.Idle or WorkerState.Busy), "{worker}", "Workers taking part in training");
        _meter.CreateObservableGauge("distdiffusion.sampling.requests", () => sampling.RequestsInFlight, "{request}", "Sampling requests being served");
        _meter.CreateObservableGauge("distdiffusion.checkpoint.age", () =>
            loop.ReadTelemetry().CheckpointAgeSeconds is { } age ? [new Measurement<double>(age)] : Array.Empty<Measurement<double>>(),
            "s", "Seconds since this coordinator last wrote a checkpoint (absent before the first)");
    }

    private static Google.Protobuf.Collections.RepeatedField<WorkerStatus> Workers(TrainingLoop loop) => loop.Status().Workers;

    private static IEnumerable<Measurement<double>> Finite(double v) => double.IsFinite(v) ? [new Measurement<double>(v)] : [];

    public void Dispose() => _meter.Dispose();
}
