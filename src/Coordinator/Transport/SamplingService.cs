using System.Diagnostics;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Sampling;
using DistDiffusion.Coordinator.Training;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Imaging;
using DistDiffusion.Model.Sampling;
using DistDiffusion.Protocol.V1;
using Google.Protobuf;
using Grpc.Core;
using static TorchSharp.torch;

namespace DistDiffusion.Coordinator.Transport;

/// <summary>
/// The client-facing Sampler service: validates the request, admits it when fewer than MaxConcurrentSampleRequests run,
/// takes one consistent weights snapshot, lets <see cref="SamplingCoordinator"/> spread the chains over the workers, and
/// streams progress and results in sample order (a sample's long trajectory over several results). A client's
/// cancellation or deadline stops the workers' chains; so does a client that reads nothing for CallTimeoutSeconds.
/// </summary>
public sealed class SamplingService(TrainingLoop loop, SamplingCoordinator sampling, CoordinatorOptions options, ILogger<SamplingService> log)
    : Sampler.SamplerBase
{
    public override async Task Sample(SampleRequest request, IServerStreamWriter<SampleResponse> responseStream, ServerCallContext context)
    {
        var recipe = loop.Description.Recipe;
        var T = recipe.Timesteps;
        var shape = recipe.SampleShape;
        Validate(request, T, recipe.IsImageData, shape.Aggregate(1L, (a, b) => a * b));
        CheckConditioning(request.HasClassLabel ? request.ClassLabel : null, request.HasGuidance ? request.Guidance : null, recipe);
        await AdmittedAsync(() => SampleAsync(request, responseStream, context, recipe, shape));
    }

    /// <summary>Runs <paramref name="body"/> as one of the at most MaxConcurrentSampleRequests requests (sample or eval) served at once.</summary>
    private async Task AdmittedAsync(Func<Task> body)
    {
        if (!sampling.TryBeginRequest())
            throw new RpcException(new Status(StatusCode.ResourceExhausted,
                $"{options.MaxConcurrentSampleRequests} sampling requests are already in progress, the most this coordinator serves at once (MaxConcurrentSampleRequests, --max-sample-requests); retry later"));
        try
        {
            await body();
        }
        finally
        {
            sampling.EndRequest();
        }
    }

    /// <summary>
    /// The sample chains' work order: the sampler and its step count (DDPM: all T, sent as 0; DDIM: the strided count,
    /// <see cref="SamplerSteps"/> the one rule for both), eta and seed.
    /// </summary>
    private static (SampleWork Template, uint Steps) ChainWork(SamplerKind sampler, uint requestedSteps, int timesteps, uint count, double eta, long seed)
    {
        var ddim = sampler == SamplerKind.Ddim;
        var steps = (uint)SamplerSteps.Count(ddim ? SamplingMethod.Ddim : SamplingMethod.Ddpm, requestedSteps, timesteps);
        return (new SampleWork { Count = count, Sampler = ddim ? SamplerKind.Ddim : SamplerKind.Ddpm, Steps = ddim ? steps : 0, Eta = eta, Seed = seed }, steps);
    }

    /// <summary>Fails the call with Unavailable once no worker has been connected for SampleWaitSeconds.</summary>
    private sealed class NoWorkerWatch(SamplingCoordinator sampling, CoordinatorOptions options, string what)
    {
        private Stopwatch? _since = sampling.WorkerCount == 0 ? Stopwatch.StartNew() : null;

        public void Check()
        {
            if (sampling.WorkerCount > 0) _since = null;
            else if ((_since ??= Stopwatch.StartNew()).Elapsed.TotalSeconds > options.SampleWaitSeconds)
                throw new RpcException(new Status(StatusCode.Unavailable,
                    $"no worker is connected to {what} (waited {options.SampleWaitSeconds:F0} s); start workers with `worker --coordinator URL`"));
        }
    }

    private async Task SampleAsync(SampleRequest request, IServerStreamWriter<SampleResponse> responseStream, ServerCallContext context, Recipe recipe, long[] shape)
    {
        var T = recipe.Timesteps;
        var ct = context.CancellationToken;
        var clock = Stopwatch.StartNew();
        var snapshot = await loop.SnapshotAsync(request.Weights != Weights.Raw, ct).WaitAsync(TimeSpan.FromSeconds(options.CallTimeoutSeconds), ct);
        var (template, steps) = ChainWork(request.Sampler, request.Steps, T, request.Count, request.Eta, request.Seed);
        var frames = Frames(steps, request.TrajectoryEvery);
        template.TrajectoryEvery = request.TrajectoryEvery;
        Condition(template, request.HasClassLabel, request.ClassLabel, request.HasGuidance, request.Guidance);
        var job = sampling.Start(template, snapshot, shape, frames, recipe.IsImageData ? 64 : 2000);
        var wantTensor = request.Tensor || !request.Png;
        var resolved = snapshot.Ema ? Weights.Ema : Weights.Raw;
        log.LogInformation("Sample job {Job}: {Count} x {Sampler} ({Steps} steps), seed {Seed}, {Weights} weights of version {Version}, {Batches} batches",
            job.Id, request.Count, template.Sampler, steps, request.Seed, resolved, snapshot.Version, job.Batches.Length);
        var writer = new BoundedWriter<SampleResponse>(responseStream, context, TimeSpan.FromSeconds(options.CallTimeoutSeconds));
        try
        {
            SampleProgress Progress(uint done) => new() { Done = done, Total = request.Count, Workers = (uint)sampling.WorkerCount, ParameterVersion = snapshot.Version, Weights = resolved, Recipe = recipe.Name };
            await writer.WriteAsync(new SampleResponse { Progress = Progress(0) });
            var next = 0;            // next batch to forward, in order
            uint done = 0;
            var noWorker = new NoWorkerWatch(sampling, options, "compute samples");
            while (next < job.Batches.Length)
            {
                using var wait = CancellationTokenSource.CreateLinkedTokenSource(ct);
                wait.CancelAfter(TimeSpan.FromMilliseconds(500));
                try
                {
                    if (await job.Changes.Reader.ReadAsync(wait.Token) is { } failure)
                        throw new RpcException(new Status(StatusCode.Internal, failure));
                }
                catch (OperationCanceledException) when (!ct.IsCancellationRequested)
                {
                    // poll: check for workers below
                }
                noWorker.Check();
                while (next < job.Batches.Length && job.Results[next] is { } output)
                {
                    await WriteBatchAsync(writer, output, shape, frames, wantTensor, request.Png);
                    done += output.Count;
                    sampling.Forwarded(job, next);   // let it go; the window moves on
                    next++;
                    await writer.WriteAsync(new SampleResponse { Progress = Progress(done) });
                }
            }
            log.LogInformation("Sample job {Job} done: {Count} samples in {Seconds:F2} s", job.Id, request.Count, clock.Elapsed.TotalSeconds);
        }
        catch (OperationCanceledException) when (ct.IsCancellationRequested)
        {
            log.LogInformation("Sample job {Job} cancelled by the client after {Seconds:F2} s", job.Id, clock.Elapsed.TotalSeconds);
            throw;
        }
        catch (TimeoutException)
        {
            log.LogWarning("Sample job {Job}: the client read nothing for {Seconds} s; ending the call and the job", job.Id, options.CallTimeoutSeconds);
            throw new RpcException(new Status(StatusCode.DeadlineExceeded, $"the client read nothing for {options.CallTimeoutSeconds} s"));
        }
        finally
        {
            sampling.End(job);
        }
    }

    /// <summary>Most held-out images one bits/dim batch of an evaluation may hold (a worker computes T network passes of it).</summary>
    internal const int MaxBpdBatch = 1024;

    /// <summary>
    /// Sampler.Evaluate: one weights snapshot (its step goes to the client) for the eval samples and the bits/dim terms;
    /// both run as jobs of <see cref="SamplingCoordinator"/> (idle workers pull batches, a lost worker's batches go to the
    /// others), and results go to the client in index order per kind as they complete. Counts as one sampling request.
    /// </summary>
    public override async Task Evaluate(EvalRequest request, IServerStreamWriter<EvalResponse> responseStream, ServerCallContext context)
    {
        var recipe = loop.Description.Recipe;
        ValidateEval(request, recipe);
        CheckConditioning(request.HasClassLabel ? request.ClassLabel : null, request.HasGuidance ? request.Guidance : null, recipe);
        await AdmittedAsync(() => EvaluateAsync(request, responseStream, context, recipe));
    }

    private async Task EvaluateAsync(EvalRequest request, IServerStreamWriter<EvalResponse> responseStream, ServerCallContext context, Recipe recipe)
    {
        var ct = context.CancellationToken;
        var clock = Stopwatch.StartNew();
        var shape = recipe.SampleShape;
        var snapshot = await loop.SnapshotAsync(request.Weights != Weights.Raw, ct).WaitAsync(TimeSpan.FromSeconds(options.CallTimeoutSeconds), ct);
        var jobs = new List<(SamplingCoordinator.Job Job, bool Bpd)>();
        if (request.Samples > 0)
        {
            var (template, _) = ChainWork(request.Sampler, request.Steps, recipe.Timesteps, request.Samples, request.Eta, request.Seed);
            Condition(template, request.HasClassLabel, request.ClassLabel, request.HasGuidance, request.Guidance);
            // One batch per worker: the client waits for all of them anyway, and fewer, larger batches cost fewer network calls.
            jobs.Add((sampling.Start(template, snapshot, shape, 0, recipe.IsImageData ? 64 : 2000, batchesPerWorker: 1), false));
        }
        if (request.BpdImages > 0)
        {
            var template = new SampleWork { Count = request.BpdImages, Seed = request.Seed, Kind = SampleWorkKind.BitsPerDim, HeldOutSize = request.HeldOutSize };
            var batch = request.BpdBatch == 0 ? (uint)Model.Metrics.Evaluator.DefaultBpdBatch : request.BpdBatch;
            jobs.Add((sampling.Start(template, snapshot, [2], 0, MaxBpdBatch, batch), true));
        }
        var resolved = snapshot.Ema ? Weights.Ema : Weights.Raw;
        var step = snapshot.Header.Step;
        log.LogInformation("Eval: {Samples} samples and bits/dim of {Images} held-out images, seed {Seed}, {Weights} weights of step {Step} (version {Version}), jobs {Jobs}",
            request.Samples, request.BpdImages, request.Seed, resolved, step, snapshot.Version, string.Join(",", jobs.Select(j => j.Job.Id)));
        var writer = new BoundedWriter<EvalResponse>(responseStream, context, TimeSpan.FromSeconds(options.CallTimeoutSeconds));
        var next = new int[jobs.Count];
        var done = new uint[jobs.Count];
        try
        {
            EvalProgress Progress() => new()
            {
                SamplesDone = (uint)jobs.Zip(done).Where(j => !j.First.Bpd).Sum(j => j.Second), SamplesTotal = request.Samples,
                ImagesDone = (uint)jobs.Zip(done).Where(j => j.First.Bpd).Sum(j => j.Second), ImagesTotal = request.BpdImages,
                Workers = (uint)sampling.WorkerCount, Step = step, ParameterVersion = snapshot.Version, Weights = resolved, Recipe = recipe.Name,
            };
            await writer.WriteAsync(new EvalResponse { Progress = Progress() });
            var noWorker = new NoWorkerWatch(sampling, options, "evaluate on");
            while (Enumerable.Range(0, jobs.Count).Any(j => next[j] < jobs[j].Job.Batches.Length))
            {
                var sent = false;
                for (var j = 0; j < jobs.Count; j++)
                {
                    var (job, bpd) = jobs[j];
                    while (next[j] < job.Batches.Length && job.Results[next[j]] is { } output)
                    {
                        await writer.WriteAsync(bpd ? BitsPerDimResult(output) : new EvalResponse
                        {
                            Samples = new EvalSamples { FirstIndex = output.FirstIndex, Count = output.Count, Shape = { shape }, Tensor = output.Samples },
                        });
                        done[j] += output.Count;
                        sampling.Forwarded(job, next[j]);
                        next[j]++;
                        sent = true;
                    }
                }
                if (sent)
                {
                    await writer.WriteAsync(new EvalResponse { Progress = Progress() });
                    continue;
                }
                noWorker.Check();
                // Wait for a change of any job (a result or a failure), polling for lost workers twice a second.
                using var wait = CancellationTokenSource.CreateLinkedTokenSource(ct);
                wait.CancelAfter(TimeSpan.FromMilliseconds(500));
                try
                {
                    await Task.WhenAny(jobs.Select(j => j.Job.Changes.Reader.WaitToReadAsync(wait.Token).AsTask()));
                }
                catch (OperationCanceledException) when (!ct.IsCancellationRequested)
                {
                    // poll
                }
                ct.ThrowIfCancellationRequested();
                foreach (var (job, _) in jobs)
                    while (job.Changes.Reader.TryRead(out var failure))
                        if (failure is not null) throw new RpcException(new Status(StatusCode.Internal, failure));
            }
            log.LogInformation("Eval at step {Step} done in {Seconds:F2} s", step, clock.Elapsed.TotalSeconds);
        }
        catch (OperationCanceledException) when (ct.IsCancellationRequested)
        {
            log.LogInformation("Eval at step {Step} cancelled by the client after {Seconds:F2} s", step, clock.Elapsed.TotalSeconds);
            throw;
        }
        catch (TimeoutException)
        {
            log.LogWarning("Eval at step {Step}: the client read nothing for {Seconds} s; ending the call and its jobs", step, options.CallTimeoutSeconds);
            throw new RpcException(new Status(StatusCode.DeadlineExceeded, $"the client read nothing for {options.CallTimeoutSeconds} s"));
        }
        finally
        {
            foreach (var (job, _) in jobs) sampling.End(job);
        }
    }

    /// <summary>A bits/dim batch ([count, 2] interleaved total, prior) as the client's two float32 vectors.</summary>
    private static EvalResponse BitsPerDimResult(SampleOutput output)
    {
        var values = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(output.Samples.Span);
        var totals = new float[output.Count];
        var priors = new float[output.Count];
        for (var i = 0; i < totals.Length; i++) (totals[i], priors[i]) = (values[2 * i], values[2 * i + 1]);
        return new EvalResponse
        {
            BitsPerDim = new EvalBitsPerDim
            {
                FirstIndex = output.FirstIndex, Count = output.Count,
                Totals = ByteString.CopyFrom(System.Runtime.InteropServices.MemoryMarshal.AsBytes(totals.AsSpan())),
                Priors = ByteString.CopyFrom(System.Runtime.InteropServices.MemoryMarshal.AsBytes(priors.AsSpan())),
            },
        };
    }

    private void ValidateEval(EvalRequest r, Recipe recipe)
    {
        static RpcException Bad(StatusCode code, string message) => new(new Status(code, message));
        var T = recipe.Timesteps;
        if (r.Samples == 0 && r.BpdImages == 0) throw Bad(StatusCode.InvalidArgument, "samples 0 and bpd_images 0: expected at least 1 of either");
        if (r.Samples > options.MaxSamplesPerRequest)
            throw Bad(StatusCode.ResourceExhausted, $"samples {r.Samples}: at most {options.MaxSamplesPerRequest} samples per request (raise MaxSamplesPerRequest)");
        if (r.Samples is > 0 and < 2 && !recipe.IsImageData) throw Bad(StatusCode.InvalidArgument, $"samples {r.Samples}: expected at least 2 for a distance to held-out data");
        if (r.BpdImages > 0 && !recipe.IsImageData)
            throw Bad(StatusCode.InvalidArgument, $"bpd_images {r.BpdImages}: recipe {recipe.Name} has 2-D points, bits/dim is for image recipes (expected 0)");
        if (r.BpdImages > options.MaxSamplesPerRequest)
            throw Bad(StatusCode.ResourceExhausted, $"bpd_images {r.BpdImages}: at most {options.MaxSamplesPerRequest} images per request (raise MaxSamplesPerRequest)");
        if (r.BpdImages > 0 && r.HeldOutSize < r.BpdImages)
            throw Bad(StatusCode.InvalidArgument, $"held_out_size {r.HeldOutSize}: expected at least bpd_images ({r.BpdImages})");
        if (r.BpdBatch > MaxBpdBatch) throw Bad(StatusCode.InvalidArgument, $"bpd_batch {r.BpdBatch}: expected 0 (128) or 1..{MaxBpdBatch} images per batch");
        if (r.Sampler is not (SamplerKind.Unspecified or SamplerKind.Ddpm or SamplerKind.Ddim))
            throw Bad(StatusCode.InvalidArgument, $"sampler {(int)r.Sampler}: expected SAMPLER_KIND_DDPM or SAMPLER_KIND_DDIM");
        if (r.Weights is not (Weights.Unspecified or Weights.Ema or Weights.Raw))
            throw Bad(StatusCode.InvalidArgument, $"weights {(int)r.Weights}: expected WEIGHTS_EMA or WEIGHTS_RAW");
        var kind = r.Sampler == SamplerKind.Ddim ? SamplingMethod.Ddim : SamplingMethod.Ddpm;
        if (SamplerSteps.Problem(kind, r.Steps, T) is { } stepsProblem) throw Bad(StatusCode.InvalidArgument, stepsProblem);
        if (kind == SamplingMethod.Ddim)
        {
            if (!(r.Eta >= 0 && r.Eta <= 1)) throw Bad(StatusCode.InvalidArgument, $"eta {r.Eta}: expected 0..1");
        }
        else if (r.Eta != 0) throw Bad(StatusCode.InvalidArgument, $"eta {r.Eta}: only DDIM takes eta");
    }

    /// <summary>A class and guidance scale the recipe's model can take (<see cref="ClassGuidance.Problem"/>), else InvalidArgument naming them.</summary>
    private static void CheckConditioning(int? classLabel, double? guidance, Recipe recipe)
    {
        if (new ClassGuidance(classLabel, guidance).Problem(recipe.Classes) is { } problem)
            throw new RpcException(new Status(StatusCode.InvalidArgument, problem.Replace("class =", "class_label =", StringComparison.Ordinal)));
    }

    /// <summary>Copies a request's optional class and guidance into a chains work order.</summary>
    private static void Condition(SampleWork work, bool hasClass, int classLabel, bool hasGuidance, double guidance)
    {
        if (hasClass) work.ClassLabel = classLabel;
        if (hasGuidance) work.Guidance = guidance;
    }

    /// <summary>Trajectory frames per sample: x_T, then every k-th step, and x_0 (0 when no trajectory is asked).</summary>
    private static int Frames(uint steps, uint every) => every == 0 ? 0 : (int)((steps + every - 1) / every) + 1;

    /// <summary>
    /// Writes to the client, each write bounded by the call timeout: a client that reads nothing for that long has its
    /// call reset (so nothing stays queued for it) and the write throws <see cref="TimeoutException"/>.
    /// </summary>
    private sealed class BoundedWriter<TMessage>(IServerStreamWriter<TMessage> stream, ServerCallContext context, TimeSpan timeout)
    {
        public async Task WriteAsync(TMessage message)
        {
            var write = stream.WriteAsync(message, context.CancellationToken);
            try
            {
                await write.WaitAsync(timeout, context.CancellationToken);
            }
            catch (TimeoutException)
            {
                _ = write.ContinueWith(static t => _ = t.Exception, CancellationToken.None, TaskContinuationOptions.OnlyOnFaulted | TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
                context.GetHttpContext().Abort();
                throw;
            }
        }
    }

    private void Validate(SampleRequest r, int T, bool images, long sampleElements)
    {
        static RpcException Bad(StatusCode code, string message) => new(new Status(code, message));
        if (r.Count == 0) throw Bad(StatusCode.InvalidArgument, "count 0: expected at least 1 sample");
        if (r.Count > options.MaxSamplesPerRequest)
            throw Bad(StatusCode.ResourceExhausted, $"count {r.Count}: at most {options.MaxSamplesPerRequest} samples per request (split it, or raise MaxSamplesPerRequest)");
        if (r.Sampler is not (SamplerKind.Unspecified or SamplerKind.Ddpm or SamplerKind.Ddim))
            throw Bad(StatusCode.InvalidArgument, $"sampler {(int)r.Sampler}: expected SAMPLER_KIND_DDPM or SAMPLER_KIND_DDIM");
        if (r.Weights is not (Weights.Unspecified or Weights.Ema or Weights.Raw))
            throw Bad(StatusCode.InvalidArgument, $"weights {(int)r.Weights}: expected WEIGHTS_EMA or WEIGHTS_RAW");
        var kind = r.Sampler == SamplerKind.Ddim ? SamplingMethod.Ddim : SamplingMethod.Ddpm;
        if (SamplerSteps.Problem(kind, r.Steps, T) is { } stepsProblem) throw Bad(StatusCode.InvalidArgument, stepsProblem);
        if (kind == SamplingMethod.Ddim)
        {
            if (!(r.Eta >= 0 && r.Eta <= 1)) throw Bad(StatusCode.InvalidArgument, $"eta {r.Eta}: expected 0..1");
        }
        else if (r.Eta != 0) throw Bad(StatusCode.InvalidArgument, $"eta {r.Eta}: only DDIM takes eta");
        if (r.TrajectoryEvery > T) throw Bad(StatusCode.InvalidArgument, $"trajectory_every {r.TrajectoryEvery}: expected 0..{T}");
        if (r.TrajectoryEvery > 0)
        {
            // One sample with its trajectory is one batch, held whole by the coordinator: it must stay within bounds.
            var steps = (uint)SamplerSteps.Count(kind, r.Steps, T);
            var bytes = sampleElements * 4 * (1 + Frames(steps, r.TrajectoryEvery));
            if (bytes > SamplingCoordinator.MaxSampleBytes)
            {
                var least = Enumerable.Range(1, T).FirstOrDefault(k => sampleElements * 4 * (1 + Frames(steps, (uint)k)) <= SamplingCoordinator.MaxSampleBytes);
                throw Bad(StatusCode.InvalidArgument,
                    $"trajectory_every {r.TrajectoryEvery}: one sample with its {Frames(steps, r.TrajectoryEvery)} trajectory frames is {bytes} bytes, over the limit of {SamplingCoordinator.MaxSampleBytes} bytes per sample; "
                    + (least > 0 ? $"use trajectory_every {least} or more" : "this recipe's samples are too large for a trajectory"));
            }
        }
        if (r.Png && !images) throw Bad(StatusCode.InvalidArgument, "png: this recipe's samples are 2-D points, not images; ask for tensors");
    }

    /// <summary>Most trajectory bytes one result message carries; a sample's further frames follow in results of their own.</summary>
    private const int ResultTrajectoryBytes = 1 << 20;

    private static async Task WriteBatchAsync(BoundedWriter<SampleResponse> stream, SampleOutput output, long[] shape, int frames, bool tensor, bool png)
    {
        var elements = (int)shape.Aggregate(1L, (a, b) => a * b);
        var bytesPer = elements * 4;
        var framesPer = Math.Max(1, ResultTrajectoryBytes / bytesPer);
        for (var k = 0; k < output.Count; k++)
        {
            var result = new SampleResult { Index = output.FirstIndex + (uint)k, Shape = { shape }, TrajectoryFrames = (uint)frames };
            var slice = output.Samples.Memory.Slice(k * bytesPer, bytesPer);
            if (tensor) result.Tensor = UnsafeByteOperations.UnsafeWrap(slice);
            if (png) result.Png = ByteString.CopyFrom(EncodePng(slice.Span, shape));
            var f = 0;
            do
            {
                for (var end = Math.Min(frames, f + framesPer); f < end; f++)
                    result.Trajectory.Add(UnsafeByteOperations.UnsafeWrap(output.Trajectory[f].Memory.Slice(k * bytesPer, bytesPer)));
                await stream.WriteAsync(new SampleResponse { Result = result });
                result = new SampleResult { Index = output.FirstIndex + (uint)k, TrajectoryOffset = (uint)f, TrajectoryFrames = (uint)frames };
            }
            while (f < frames);
        }
    }

    private static byte[] EncodePng(ReadOnlySpan<byte> sample, long[] shape)
    {
        using var guard = Model.TorchRuntime.Compute();
        using var scope = NewDisposeScope();
        var t = tensor(System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(sample).ToArray(), [1, .. shape]);
        return ImageGrid.Encode(t);
    }
}
