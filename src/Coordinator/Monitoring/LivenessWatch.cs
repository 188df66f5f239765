using System.Globalization;
using DistDiffusion.Protocol.V1;

namespace DistDiffusion.Coordinator.Monitoring;

/// <summary>
/// What the liveness watch reads of the coordinator each time: the run's state, the workers taking part, the step, and a
/// count that moves while sampling jobs receive batches (the final picture holds the loop at its last step meanwhile).
/// </summary>
public readonly record struct LoopReading(RunState State, int LiveWorkers, long Step, long SamplingProgress);

/// <summary>The watch's answer: alive or not, and why, in words for the log.</summary>
public readonly record struct LivenessVerdict(bool Alive, string Reason);

/// <summary>
/// Whether the training loop is making progress: not alive once it has been training with live workers and neither the
/// step nor the sampling count moved for <see cref="Timeout"/>. A reading that shows the run idle (waiting for workers,
/// none live), finished, serving a checkpoint (--sample-only) or failed restarts the count, and so does any progress.
/// When readings stop coming (a status read that hangs), the last one stands and its clock keeps running. A zero
/// timeout turns the watch off. Pure: the clock is injected, and the caller feeds readings and asks for verdicts.
/// </summary>
public sealed class LivenessWatch
{
    private readonly TimeProvider _clock;
    private readonly bool _sampleOnly;
    private LoopReading? _last;
    private DateTimeOffset _progressAt;

    /// <param name="timeout">How long training with live workers may go without progress (zero: never not alive).</param>
    /// <param name="sampleOnly">The coordinator serves a checkpoint and trains nothing: always alive.</param>
    public LivenessWatch(TimeSpan timeout, bool sampleOnly, TimeProvider clock)
    {
        if (timeout < TimeSpan.Zero) throw new ArgumentOutOfRangeException(nameof(timeout), timeout, "liveness timeout: expected zero (off) or a positive time");
        Timeout = timeout;
        _sampleOnly = sampleOnly;
        _clock = clock ?? throw new ArgumentNullException(nameof(clock));
        _progressAt = clock.GetUtcNow();
    }

    public TimeSpan Timeout { get; }

    /// <summary>Whether the reading counts as the loop being busy training, the one case where no progress is a failure.</summary>
    private static bool Watched(LoopReading r) => r.State == RunState.Training && r.LiveWorkers > 0;

    public void Observe(LoopReading reading)
    {
        var moved = _last is not { } last || last.Step != reading.Step || last.SamplingProgress != reading.SamplingProgress || !Watched(last);
        if (moved || !Watched(reading)) _progressAt = _clock.GetUtcNow();
        _last = reading;
    }

    public LivenessVerdict Verdict()
    {
        if (Timeout == TimeSpan.Zero) return new(true, "liveness check off (--liveness-timeout 0)");
        if (_sampleOnly) return new(true, "serving samples from a checkpoint (--sample-only)");
        if (_last is not { } last) return new(true, "starting");
        if (!Watched(last))
        {
            return new(true, last.State switch
            {
                RunState.Complete => "training complete",
                RunState.Serving => "serving samples",
                RunState.Failed => "training stopped",
                _ when last.LiveWorkers == 0 => "no worker live",
                _ => "waiting for workers",
            });
        }
        var still = _clock.GetUtcNow() - _progressAt;
        var inv = CultureInfo.InvariantCulture;
        return still > Timeout
            ? new(false, string.Create(inv, $"no training progress for {still.TotalSeconds:F0} s at step {last.Step} with {last.LiveWorkers} workers live (--liveness-timeout {Timeout.TotalSeconds:G} s)"))
            : new(true, string.Create(inv, $"training, step {last.Step}"));
    }
}
