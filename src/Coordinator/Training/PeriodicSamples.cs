using System.Diagnostics;
using System.Globalization;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Observe;
using DistDiffusion.Coordinator.Sampling;
using DistDiffusion.Protocol.V1;
using static TorchSharp.torch;

namespace DistDiffusion.Coordinator.Training;

/// <summary>
/// The recipe's sample-every for the distributed trainer: at such a step the loop pins its weights (one snapshot, EMA
/// when kept) and this fans the chains out over the workers through the sampling path the Sample RPC uses, while
/// training goes on; the picture goes to OUT/samples/step-N.png (the name `coordinator train` uses). One job at a time,
/// and at most one waiting: a newer step waiting replaces an older one, which is skipped (logged).
/// </summary>
public sealed class PeriodicSamples(SamplingCoordinator sampling, RunSetup run, CoordinatorOptions options, ILogger<PeriodicSamples> log, TensorBoardSink? tensorBoard = null)
{
    private readonly object _lock = new();
    private Task _running = Task.CompletedTask;
    private bool _busy;
    private (WeightsSnapshot Snapshot, long Step)? _pending;

    /// <summary>The jobs in flight and waiting, if any (the loop awaits them before telling the workers training is over).</summary>
    public Task Running
    {
        get
        {
            lock (_lock) return _running;
        }
    }

    public static string PathFor(string runDir, long step) => Path.Combine(runDir, "samples", string.Create(CultureInfo.InvariantCulture, $"step-{step:D7}.png"));

    /// <summary>Samples the weights of <paramref name="snapshot"/> for step <paramref name="step"/>: now, or once the job in flight is done.</summary>
    public void Start(WeightsSnapshot snapshot, long step, CancellationToken ct)
    {
        lock (_lock)
        {
            if (_busy)
            {
                if (_pending is { } older)
                    log.LogWarning("Samples of step {Step} skipped: sampling is slower than sample-every, and step {Newer} waits now", older.Step, step);
                _pending = (snapshot, step);
                return;
            }
            _busy = true;
            _running = Task.Run(() => DrainAsync(snapshot, step, ct), CancellationToken.None);
        }
    }

    private async Task DrainAsync(WeightsSnapshot snapshot, long step, CancellationToken ct)
    {
        while (true)
        {
            await RunAsync(snapshot, step, ct);
            lock (_lock)
            {
                if (_pending is not { } next || ct.IsCancellationRequested)
                {
                    _pending = null;
                    _busy = false;
                    return;
                }
                _pending = null;
                (snapshot, step) = next;
            }
        }
    }

    private async Task RunAsync(WeightsSnapshot snapshot, long step, CancellationToken ct)
    {
        var recipe = run.State.Recipe;
        var shape = recipe.SampleShape;
        var n = recipe.IsImageData ? 64 : 1000;
        var elements = (int)shape.Aggregate(1L, (a, b) => a * b);
        var clock = Stopwatch.StartNew();
        var job = sampling.Start(new SampleWork { Count = (uint)n, Sampler = SamplerKind.Ddpm, Seed = 0 }, snapshot, shape, 0, recipe.IsImageData ? 64 : 2000);
        try
        {
            var values = new float[n * elements];
            var next = 0;
            var noWorkerSince = sampling.WorkerCount == 0 ? Stopwatch.StartNew() : null;
            while (next < job.Batches.Length)
            {
                using var wait = CancellationTokenSource.CreateLinkedTokenSource(ct);
                wait.CancelAfter(TimeSpan.FromMilliseconds(500));
                try
                {
                    if (await job.Changes.Reader.ReadAsync(wait.Token) is { } failure) throw new InvalidOperationException(failure);
                }
                catch (OperationCanceledException) when (!ct.IsCancellationRequested)
                {
                    // poll: check for workers below
                }
                if (sampling.WorkerCount > 0) noWorkerSince = null;
                else if ((noWorkerSince ??= Stopwatch.StartNew()).Elapsed.TotalSeconds > options.SampleWaitSeconds)
                    throw new InvalidOperationException($"no worker connected for {options.SampleWaitSeconds:F0} s");
                while (next < job.Batches.Length && job.Results[next] is { } output)
                {
                    System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(output.Samples.Span).CopyTo(values.AsSpan((int)output.FirstIndex * elements));
                    sampling.Forwarded(job, next);
                    next++;
                }
            }
            var path = PathFor(run.RunDir, step);
            using (Model.TorchRuntime.Compute())
            {
                using var scope = NewDisposeScope();
                var samples = tensor(values, [n, .. shape]);
                var reference = RunPictures.Reference(recipe, n);
                RunPictures.Write(path, samples, recipe, reference, $"{recipe.Name} step {step}");
            }
            tensorBoard?.Picture(step, path);
            log.LogInformation("Samples of step {Step} ({Count}, {Weights} weights of version {Version}) in {Seconds:F2} s: {Path}",
                step, n, snapshot.Ema ? "EMA" : "raw", snapshot.Version, clock.Elapsed.TotalSeconds, path);
        }
        catch (OperationCanceledException) when (ct.IsCancellationRequested)
        {
            log.LogInformation("Samples of step {Step} abandoned: shutting down", step);
        }
#pragma warning disable CA1031 // a failed sample grid must not stop training; it is logged
        catch (Exception e)
#pragma warning restore CA1031
        {
            log.LogWarning(e, "Samples of step {Step} not written", step);
        }
        finally
        {
            sampling.End(job);
        }
    }
}
