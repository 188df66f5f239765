using System.Collections.Concurrent;
using System.Threading.Channels;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Sampling;
using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;
using Grpc.Core;
using Microsoft.Extensions.Logging;
using static TorchSharp.torch;

namespace DistDiffusion.Worker;

/// <summary>
/// A worker's sampling side: caches the weights the coordinator sends (by weights id), runs batches of reverse
/// chains on its own task — so a training step keeps flowing and a cancel arrives while a chain runs — and
/// streams each batch back. Chain i of a request draws its noise from (seed, i) only, whatever the batch.
/// </summary>
internal sealed class WorkerSampler : IDisposable
{
    private readonly WorkerModel _model;
    private readonly Device _device;
    private readonly Action<WorkerMessage> _send;
    private readonly ILogger _log;
    private readonly Channel<SampleWork> _queue = Channel.CreateUnbounded<SampleWork>(new UnboundedChannelOptions { SingleReader = true });
    private readonly ConcurrentDictionary<ulong, CancellationTokenSource> _jobs = new();
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _runner;
    private (ulong Id, TensorAssembler Assembler)? _incoming;
    private readonly ConcurrentDictionary<ulong, float[]> _weights = new();
    private (ulong Id, DiffusionModel Model)? _loaded;

    public WorkerSampler(WorkerModel model, Device device, Action<WorkerMessage> send, ILogger log)
    {
        _model = model;
        _device = device;
        _send = send;
        _log = log;
        _runner = Task.Run(RunAsync);
    }

    public void BeginWeights(WeightsHeader header) =>
        _incoming = (header.WeightsId, new TensorAssembler(header.Tensor, _model.Vector.Elements, $"sampling weights {header.WeightsId}"));

    public void AddWeightsChunk(WeightsChunk chunk)
    {
        if (_incoming is not { } incoming || incoming.Id != chunk.WeightsId)
            throw new ProtocolException(StatusCode.Internal, $"weights chunk for {chunk.WeightsId} without its header");
        incoming.Assembler.Add(chunk.Chunk);
        if (!incoming.Assembler.IsComplete) return;
        // Keep the two newest weight sets (a request in flight and the next one).
        foreach (var old in _weights.Keys.Where(k => k < incoming.Id).OrderDescending().Skip(1)) _weights.TryRemove(old, out _);
        _weights[incoming.Id] = incoming.Assembler.ToFloat32();
        _incoming = null;
    }

    public void Enqueue(SampleWork work)
    {
        _jobs.GetOrAdd(work.JobId, _ => new CancellationTokenSource());
        _queue.Writer.TryWrite(work);
    }

    public void Cancel(ulong jobId)
    {
        // Not disposed: the runner may be reading the job's token at this moment (Token throws once disposed), and a
        // source without a timer or linked tokens holds no native resource.
#pragma warning disable CA2000
        if (_jobs.TryRemove(jobId, out var cts)) cts.Cancel();
#pragma warning restore CA2000
    }

    private async Task RunAsync()
    {
        try
        {
            await foreach (var work in _queue.Reader.ReadAllAsync(_stop.Token))
            {
                if (!_jobs.TryGetValue(work.JobId, out var job) || job.IsCancellationRequested) continue;
                try
                {
                    Run(work, job.Token);
                }
                catch (OperationCanceledException)
                {
                    _log.LogDebug("Sample job {Job} batch {Batch} cancelled", work.JobId, work.Batch);
                }
                catch (Exception e) when (e is not ObjectDisposedException)
                {
                    _log.LogWarning("Sample job {Job} batch {Batch} failed: {Error}", work.JobId, work.Batch, e.Message);
                    TrySend(new WorkerMessage { SampleOutput = new SampleOutput { JobId = work.JobId, Batch = work.Batch, FirstIndex = work.FirstIndex, Count = work.Count, Error = e.Message } });
                }
            }
        }
        catch (OperationCanceledException)
        {
            // session over
        }
    }

    private void Run(SampleWork work, CancellationToken ct)
    {
        if (work.Kind == SampleWorkKind.BitsPerDim)
        {
            RunBitsPerDim(work, ct);
            return;
        }
        var model = ModelFor(work.WeightsId);
        var kind = work.Sampler == SamplerKind.Ddim ? SamplingMethod.Ddim : SamplingMethod.Ddpm;
        var request = new SamplingRequest((int)work.Count, kind, (int)work.Steps, work.Eta, work.Seed, work.FirstIndex, (int)work.TrajectoryEvery,
            new ClassGuidance(work.HasClassLabel ? work.ClassLabel : null, work.HasGuidance ? work.Guidance : null));
        var clock = System.Diagnostics.Stopwatch.StartNew();
        using var result = model.Sample(request, batchSize: (int)work.Count, ct: ct);
        var head = new SampleOutput { JobId = work.JobId, Batch = work.Batch, FirstIndex = work.FirstIndex, Count = work.Count };
        var frames = result.Trajectory.Select(f => (ReadOnlyMemory<byte>)Bytes(f)).ToList();
        _log.LogDebug("Sample job {Job} batch {Batch}: {Count} chains in {Seconds:F2} s", work.JobId, work.Batch, work.Count, clock.Elapsed.TotalSeconds);
        // Inline when it fits one message, else header + chunks (a long trajectory of even one sample can pass the limit).
        foreach (var message in SampleTransport.Output(head, Bytes(result.Samples), frames))
            if (!TrySend(message)) return;
    }

    /// <summary>
    /// The bound of held-out images first..+count of this worker's own split, with the noise of (seed, image, t): the
    /// per-image terms of the one-process <see cref="Model.Metrics.Evaluator.BitsPerDim"/>. Sent as float32 [count, 2] (total, prior).
    /// </summary>
    private void RunBitsPerDim(SampleWork work, CancellationToken ct)
    {
        var model = ModelFor(work.WeightsId);
        var heldOut = _model.HeldOut(work.HeldOutSize);
        if ((long)work.FirstIndex + work.Count > heldOut.Count)
            throw new InvalidOperationException($"held-out images {work.FirstIndex}..+{work.Count}: this worker's split has {heldOut.Count}");
        var clock = System.Diagnostics.Stopwatch.StartNew();
        byte[] bytes;
        Model.TorchRuntime.UseIntraOpThreads(Model.TorchRuntime.ConfiguredThreads);   // as sampling: training work leaves its thread at one
        using (Model.TorchRuntime.Compute())
        using (var scope = NewDisposeScope())
        {
            var images = heldOut.Data.narrow(0, work.FirstIndex, work.Count);
            var (total, prior) = Model.Metrics.Evaluator.BitsPerDim(model, images, work.Seed, (int)work.Count, work.FirstIndex, ct);
            bytes = Bytes(stack([total, prior], 1));
        }
        _log.LogDebug("Eval job {Job} batch {Batch}: bits/dim of {Count} held-out images in {Seconds:F2} s", work.JobId, work.Batch, work.Count, clock.Elapsed.TotalSeconds);
        var head = new SampleOutput { JobId = work.JobId, Batch = work.Batch, FirstIndex = work.FirstIndex, Count = work.Count };
        foreach (var message in SampleTransport.Output(head, bytes, []))
            if (!TrySend(message)) return;
    }

    private static byte[] Bytes(Tensor t)
    {
        using var cpu = t.to_type(ScalarType.Float32).cpu().contiguous();
        return cpu.bytes.ToArray();
    }

    private DiffusionModel ModelFor(ulong weightsId)
    {
        if (_loaded is { } loaded && loaded.Id == weightsId) return loaded.Model;
        if (!_weights.TryGetValue(weightsId, out var values))
            throw new InvalidOperationException($"sampling weights {weightsId} were not received");
        var model = DiffusionModel.FromVector(_model.Recipe, values, _device);
        _loaded?.Model.Dispose();
        _loaded = (weightsId, model);
        return model;
    }

    /// <summary>Sends; false when the session closed (the coordinator hands the batch to another worker).</summary>
    private bool TrySend(WorkerMessage message)
    {
        try
        {
            _send(message);
            return true;
        }
        catch (OperationCanceledException)
        {
            return false;
        }
    }

    public void Dispose()
    {
        _stop.Cancel();
        _queue.Writer.TryComplete();
        foreach (var cts in _jobs.Values) cts.Cancel();
        bool ended;
        try { ended = _runner.Wait(TimeSpan.FromSeconds(10)); } catch (AggregateException) { ended = true; /* cancelled or failed: over either way */ }
        _loaded?.Model.Dispose();
        // Only once the runner has ended: a runner not yet started still reads _stop.Token, which throws once the
        // source is disposed. A runner still busy after ten seconds keeps the (cancelled, timer-less) source.
        if (ended) _stop.Dispose();
    }
}
