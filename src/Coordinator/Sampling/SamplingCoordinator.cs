using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Threading.Channels;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Workers;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Google.Protobuf;
using Grpc.Core;
using Microsoft.Extensions.Logging;

namespace DistDiffusion.Coordinator.Sampling;

/// <summary>
/// Fans sampling requests out over the connected workers. A request becomes batches of chains
/// (samples first..first+count-1); idle workers pull the next batch of the oldest request (at most two
/// outstanding each), so each worker gets work in proportion to its speed. Batches of a worker that leaves
/// go back to the front of the queue. Results are kept per batch and forwarded in sample order.
/// Sample i depends only on (seed, i), so the split never changes the samples.
/// <para>Bounded: a request is handed out only a window of batches ahead of what its client has been sent (at most
/// <see cref="WindowBatchesPerWorker"/> per worker and <see cref="WindowBytes"/> of results), so a client that reads
/// slowly or not at all holds the workers back instead of filling the coordinator's memory; at most
/// <see cref="CoordinatorOptions.MaxConcurrentSampleRequests"/> requests run at once.</para>
/// <para>Liveness, in training, between steps, in --keep-serving and --sample-only alike: every quarter second a worker
/// silent for four heartbeat intervals, or one that has not returned the batch it runs within
/// <see cref="CoordinatorOptions.SampleBatchDeadlineSeconds"/>, is dropped (its stream ends with DeadlineExceeded) and
/// its batches go to the others. A worker that sends a malformed result is dropped the same way (by the stream
/// handler, with the <see cref="ProtocolException"/> thrown here) and its batch is computed again elsewhere.</para>
/// </summary>
public sealed class SamplingCoordinator(CoordinatorOptions options, ILogger<SamplingCoordinator> log) : BackgroundService
{
    private const int OutstandingPerWorker = 2;
    /// <summary>A batch's results stay under this when one sample fits (larger samples go one per batch, chunked).</summary>
    private const int MaxBatchBytes = SampleTransport.InlineBytes;
    /// <summary>Batches a request may have handed out or waiting to be sent, ahead of its client, per worker.</summary>
    internal const int WindowBatchesPerWorker = 4;
    /// <summary>Result bytes a request may hold ahead of its client (at least one batch).</summary>
    internal const long WindowBytes = 64L << 20;
    /// <summary>Most bytes one sample with its trajectory may take (it is one batch, held whole by the coordinator).</summary>
    internal const long MaxSampleBytes = 16L << 20;
    private static readonly TimeSpan CheckEvery = TimeSpan.FromMilliseconds(250);
    private readonly object _gate = new();
    private readonly List<Slot> _workers = [];
    private readonly List<Job> _jobs = [];
    private long _nextJob;
    private int _requests;

    private sealed class Slot(WorkerConnection worker)
    {
        public WorkerConnection Worker { get; } = worker;
        /// <summary>Batches handed to the worker, in the order it runs them.</summary>
        public List<(Job Job, int Batch)> Outstanding { get; } = [];
        public HashSet<ulong> WeightsSent { get; } = [];
        /// <summary>Jobs this worker got work of (told when the job ends, so it forgets them).</summary>
        public HashSet<ulong> JobsSent { get; } = [];
        /// <summary>When the batch the worker runs now (the first outstanding) became its first.</summary>
        public long HeadSince { get; set; } = Stopwatch.GetTimestamp();
        /// <summary>A chunked result being received.</summary>
        public (Job Job, int Batch, SampleOutput Head, TensorAssembler Assembler)? Incoming { get; set; }
        /// <summary>A chunked result nobody waits for any more (cancelled): its chunks are skipped.</summary>
        public (ulong Job, uint Batch)? Ignoring { get; set; }

        public void RemoveOutstanding(int index)
        {
            Outstanding.RemoveAt(index);
            if (index == 0) HeadSince = Stopwatch.GetTimestamp();
        }
    }

    internal sealed class Job(ulong id, SampleWork template, WeightsSnapshot weights, (uint First, uint Count)[] batches)
    {
        public ulong Id { get; } = id;
        public SampleWork Template { get; } = template;
        public WeightsSnapshot Weights { get; } = weights;
        public (uint First, uint Count)[] Batches { get; } = batches;
        public LinkedList<int> Pending { get; } = new(Enumerable.Range(0, batches.Length));
        public SampleOutput?[] Results { get; } = new SampleOutput?[batches.Length];
        public int[] Failures { get; } = new int[batches.Length];
        public Channel<string?> Changes { get; } = Channel.CreateUnbounded<string?>();
        public int SampleElements { get; init; }
        /// <summary>Trajectory frames per sample (0: none).</summary>
        public int Frames { get; init; }
        /// <summary>Bytes of a full batch's results.</summary>
        public long BatchBytes { get; init; }
        /// <summary>Batches sent to the client (all before this index).</summary>
        public int Forwarded { get; set; }
    }

    /// <summary>A request's state, for tests and diagnostics.</summary>
    internal sealed record JobFigures(ulong Id, int Batches, int Pending, int Outstanding, int Forwarded, int Held, long HeldBytes);

    public int WorkerCount
    {
        get { lock (_gate) return _workers.Count; }
    }

    /// <summary>Counts a new request in; false when <see cref="CoordinatorOptions.MaxConcurrentSampleRequests"/> already run.</summary>
    public bool TryBeginRequest()
    {
        if (Interlocked.Increment(ref _requests) <= options.MaxConcurrentSampleRequests) return true;
        Interlocked.Decrement(ref _requests);
        return false;
    }

    public void EndRequest() => Interlocked.Decrement(ref _requests);

    /// <summary>Sampling requests being served now.</summary>
    public int RequestsInFlight => Math.Min(Math.Max(0, Volatile.Read(ref _requests)), options.MaxConcurrentSampleRequests);

    internal IReadOnlyList<JobFigures> Jobs()
    {
        lock (_gate)
        {
            return [.. _jobs.Select(j => new JobFigures(j.Id, j.Batches.Length, j.Pending.Count, _workers.Sum(s => s.Outstanding.Count(o => o.Job == j)), j.Forwarded,
                j.Results.Count(r => r is not null), j.Results.Sum(r => r is null ? 0L : r.Samples.Length + r.Trajectory.Sum(f => (long)f.Length))))];
        }
    }

    public void AddWorker(WorkerConnection w)
    {
        lock (_gate)
        {
            _workers.Add(new Slot(w));
            Dispatch();
        }
    }

    /// <summary>The worker's stream ended: its batches go back to the queue.</summary>
    public void RemoveWorker(WorkerConnection w)
    {
        lock (_gate)
        {
            var slot = _workers.Find(s => s.Worker == w);
            if (slot is null) return;
            Remove(slot);
        }
    }

    private void Remove(Slot slot)
    {
        _workers.Remove(slot);
        foreach (var (job, batch) in slot.Outstanding)
        {
            if (job.Results[batch] is not null) continue;
            job.Pending.AddFirst(batch);
            log.LogInformation("Sample job {Job} batch {Batch} of {Worker} goes back to the queue", job.Id, batch, slot.Worker.Id);
        }
        slot.Outstanding.Clear();
        slot.Incoming = null;
        Dispatch();
    }

    /// <summary>Drops workers that went silent or sit on a batch past the deadline (called every <see cref="CheckEvery"/>).</summary>
    internal void CheckLiveness()
    {
        var dropped = new List<(WorkerConnection Worker, string Why)>();
        lock (_gate)
        {
            foreach (var slot in _workers.ToList())
            {
                var silent = slot.Worker.SecondsSinceSeen;
                string? why = null;
                if (silent > options.HeartbeatTimeoutSeconds)
                    why = $"silent for {silent:F0} s (heartbeat every {options.HeartbeatSeconds} s)";
                else if (slot.Outstanding.Count > 0 && Stopwatch.GetElapsedTime(slot.HeadSince).TotalSeconds > options.SampleBatchDeadlineSeconds)
                    why = $"sample job {slot.Outstanding[0].Job.Id} batch {slot.Outstanding[0].Batch} not returned within the sampling deadline of {options.SampleBatchDeadlineSeconds} s";
                if (why is null) continue;
                log.LogWarning("Dropping worker {Worker}: {Reason}; its {Batches} sampling batches go to other workers", slot.Worker.Id, why, slot.Outstanding.Count);
                Remove(slot);
                dropped.Add((slot.Worker, why));
            }
        }
        // Outside the lock: ending the stream runs its handler's cancellation, which comes back here (RemoveWorker).
        foreach (var (worker, why) in dropped) worker.Abort(StatusCode.DeadlineExceeded, why);
    }

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        using var timer = new PeriodicTimer(CheckEvery);
        try
        {
            while (await timer.WaitForNextTickAsync(stoppingToken))
                CheckLiveness();
        }
        catch (OperationCanceledException)
        {
            // shutting down
        }
    }

    private static ProtocolException Bad(string message, string field) => new(StatusCode.InvalidArgument, message, field);

    /// <summary>
    /// A batch came back from a worker. Checked here against what this worker holds: a result nobody waits for (its
    /// request ended) is ignored; one that does not match its batch (samples, frames, lengths) throws, and the stream
    /// handler drops the worker, whose batches go to others.
    /// </summary>
    public void OnOutput(WorkerConnection w, SampleOutput output)
    {
        lock (_gate)
        {
            var slot = _workers.Find(s => s.Worker == w);
            if (slot is null) return;   // dropped: what it still sends is not looked at
            if (slot.Incoming is { } open)
                throw Bad($"sample output for job {output.JobId} batch {output.Batch} while batch {open.Batch} of job {open.Job.Id} is still arriving in chunks", "sample_output");
            slot.Ignoring = null;
            var job = _jobs.Find(j => j.Id == output.JobId);
            var held = job is null ? -1 : slot.Outstanding.FindIndex(o => o.Job == job && o.Batch == (int)output.Batch);
            if (job is null || held < 0)
            {
                // Cancelled (or reassigned before a drop): skip it, with its chunks.
                if (output.Payload is not null) slot.Ignoring = (output.JobId, output.Batch);
                return;
            }
            var batch = (int)output.Batch;
            var (first, count) = job.Batches[batch];
            var what = $"sample output of job {job.Id} batch {batch}";
            if (output.Error.Length > 0)
            {
                slot.RemoveOutstanding(held);
                if (++job.Failures[batch] >= 3)
                {
                    job.Changes.Writer.TryWrite($"sample batch {batch} failed 3 times: {output.Error}");
                }
                else
                {
                    log.LogWarning("Sample job {Job} batch {Batch} failed on {Worker}: {Error}; retrying", job.Id, batch, w.Id, output.Error);
                    job.Pending.AddFirst(batch);
                }
                Dispatch();
                return;
            }
            if (output.FirstIndex != first || output.Count != count)
                throw Bad($"{what}: samples {output.FirstIndex}..+{output.Count}, the batch is samples {first}..+{count}", "sample_output.first_index");
            if (output.Payload is { } header)
            {
                if (output.Samples.Length > 0 || output.Trajectory.Count > 0)
                    throw Bad($"{what}: a chunked payload and inline samples at once", "sample_output.payload");
                if (header.Dtype != DType.Float32)
                    throw Bad($"{what}: payload dtype {header.Dtype}, expected DTYPE_FLOAT32", "sample_output.payload.dtype");
                // Checks shape, byte length and chunk count against what the batch must hold before anything is allocated.
                var elements = (long)count * job.SampleElements * (1 + job.Frames);
                slot.Incoming = (job, batch, output, new TensorAssembler(header, elements, what));
                return;
            }
            var bytes = (long)count * job.SampleElements * 4;
            if (output.Samples.Length != bytes)
                throw Bad($"{what}: {output.Samples.Length} bytes of samples, expected {bytes} ({count} samples of {job.SampleElements} float32)", "sample_output.samples");
            if (output.Trajectory.Count != job.Frames)
                throw Bad($"{what}: {output.Trajectory.Count} trajectory frames, expected {job.Frames}", "sample_output.trajectory");
            for (var f = 0; f < output.Trajectory.Count; f++)
                if (output.Trajectory[f].Length != bytes)
                    throw Bad($"{what}: trajectory frame {f} has {output.Trajectory[f].Length} bytes, expected {bytes}", "sample_output.trajectory");
            Complete(slot, held, job, batch, output);
        }
    }

    /// <summary>A chunk of a result announced by a SampleOutput with a payload header.</summary>
    public void OnOutputChunk(WorkerConnection w, SampleOutputChunk c)
    {
        lock (_gate)
        {
            var slot = _workers.Find(s => s.Worker == w);
            if (slot is null) return;
            if (c.Chunk is null) throw Bad($"sample output chunk for job {c.JobId} batch {c.Batch} without data", "sample_output_chunk.chunk");
            if (slot.Ignoring == (c.JobId, c.Batch)) return;
            if (slot.Incoming is not { } incoming)
                throw new ProtocolException(StatusCode.FailedPrecondition, $"sample output chunk {c.Chunk.Index} for job {c.JobId} batch {c.Batch} without its SampleOutput header", "sample_output_chunk");
            if (c.JobId != incoming.Job.Id || c.Batch != incoming.Batch)
                throw Bad($"sample output chunk for job {c.JobId} batch {c.Batch} while receiving batch {incoming.Batch} of job {incoming.Job.Id}", "sample_output_chunk.batch");
            incoming.Assembler.Add(c.Chunk);
            if (!incoming.Assembler.IsComplete) return;
            slot.Incoming = null;
            var payload = MemoryMarshal.AsBytes(incoming.Assembler.ToFloat32().AsSpan()).ToArray();   // after the checksum check
            var output = incoming.Head;
            var bytes = (int)(output.Count * incoming.Job.SampleElements * 4);
            output.Payload = null;
            output.Samples = UnsafeByteOperations.UnsafeWrap(payload.AsMemory(0, bytes));
            for (var f = 0; f < incoming.Job.Frames; f++)
                output.Trajectory.Add(UnsafeByteOperations.UnsafeWrap(payload.AsMemory((f + 1) * bytes, bytes)));
            var held = slot.Outstanding.FindIndex(o => o.Job == incoming.Job && o.Batch == incoming.Batch);
            if (held >= 0) Complete(slot, held, incoming.Job, incoming.Batch, output);
        }
    }

    private void Complete(Slot slot, int held, Job job, int batch, SampleOutput output)
    {
        slot.RemoveOutstanding(held);
        job.Results[batch] = output;
        job.Changes.Writer.TryWrite(null);
        Dispatch();
    }

    /// <summary>Batch <paramref name="batch"/> went to the client: let its results go, and move the request's window on.</summary>
    internal void Forwarded(Job job, int batch)
    {
        lock (_gate)
        {
            job.Results[batch] = null;
            job.Forwarded = batch + 1;
            Dispatch();
        }
    }

    /// <summary>Starts a job; the caller reads <see cref="Job.Changes"/> and must call <see cref="End"/>.</summary>
    /// <param name="fixedBatch">Set: batches of exactly this many (the last one fewer) at multiples of it, whatever the workers (bits/dim terms depend on the batch size).</param>
    /// <param name="batchesPerWorker">Batches per connected worker when the size is free: 2 by default (an early first result for a streaming client).</param>
    internal Job Start(SampleWork template, WeightsSnapshot weights, long[] sampleShape, int frames, int maxBatch, uint? fixedBatch = null, int batchesPerWorker = 2)
    {
        var elements = sampleShape.Aggregate(1L, (a, b) => a * b);
        var perSample = elements * 4 * (1 + frames);
        // Small enough to give every worker two batches (and an early first result), within the message limit.
        var spread = (template.Count + batchesPerWorker * Math.Max(1, WorkerCount) - 1) / (batchesPerWorker * Math.Max(1, WorkerCount));
        var batchSize = fixedBatch ?? (uint)Math.Clamp(Math.Min(MaxBatchBytes / Math.Max(1, perSample), spread), 1, maxBatch);
        var batches = new List<(uint, uint)>();
        for (uint first = 0; first < template.Count; first += batchSize)
            batches.Add((first, Math.Min(batchSize, template.Count - first)));
        lock (_gate)
        {
            var job = new Job((ulong)Interlocked.Increment(ref _nextJob), template, weights, [.. batches])
            {
                SampleElements = (int)elements,
                Frames = frames,
                BatchBytes = perSample * batchSize,
            };
            _jobs.Add(job);
            Dispatch();
            return job;
        }
    }

    /// <summary>Removes a finished or abandoned job and stops its chains on the workers.</summary>
    internal void End(Job job)
    {
        lock (_gate)
        {
            _jobs.Remove(job);
            foreach (var slot in _workers)
            {
                for (var i = slot.Outstanding.Count - 1; i >= 0; i--)
                    if (slot.Outstanding[i].Job == job) slot.RemoveOutstanding(i);
                if (slot.Incoming is { } incoming && incoming.Job == job)
                {
                    slot.Incoming = null;
                    slot.Ignoring = (job.Id, (uint)incoming.Batch);
                }
                // Every worker that had a part of it forgets the job (and stops its chains if any still run).
                if (slot.JobsSent.Remove(job.Id))
                    slot.Worker.Send(new CoordinatorMessage { CancelSampleWork = new CancelSampleWork { JobId = job.Id } });
            }
            Array.Clear(job.Results);
            job.Changes.Writer.TryComplete();
            Dispatch();
        }
    }

    /// <summary>The next batch to hand out: the oldest request's first pending batch inside its window.</summary>
    private (Job Job, int Batch)? NextBatch()
    {
        var workers = Math.Max(1, _workers.Count);
        foreach (var job in _jobs)
        {
            var window = (int)Math.Clamp(Math.Min(WindowBatchesPerWorker * (long)workers, WindowBytes / Math.Max(1, job.BatchBytes)), 1, int.MaxValue);
            for (var node = job.Pending.First; node is not null; node = node.Next)
            {
                if (node.Value - job.Forwarded >= window) continue;
                job.Pending.Remove(node);
                return (job, node.Value);
            }
        }
        return null;
    }

    private void Dispatch()
    {
        foreach (var slot in _workers.OrderBy(s => s.Outstanding.Count))
        {
            while (slot.Outstanding.Count < OutstandingPerWorker)
            {
                if (NextBatch() is not var (job, batch)) return;
                if (slot.WeightsSent.Add(job.Weights.Id))
                {
                    slot.Worker.Send(new CoordinatorMessage { SamplingWeights = new WeightsHeader { WeightsId = job.Weights.Id, Tensor = job.Weights.Header } });
                    foreach (var chunk in TensorTransport.Chunks(job.Weights.Bytes, job.Weights.Header.Step, job.Weights.Version))
                        slot.Worker.Send(new CoordinatorMessage { SamplingWeightsChunk = new WeightsChunk { WeightsId = job.Weights.Id, Chunk = chunk } });
                }
                var work = job.Template.Clone();
                work.JobId = job.Id;
                work.Batch = (uint)batch;
                work.WeightsId = job.Weights.Id;
                (work.FirstIndex, work.Count) = job.Batches[batch];
                if (slot.Outstanding.Count == 0) slot.HeadSince = Stopwatch.GetTimestamp();
                slot.Outstanding.Add((job, batch));
                slot.JobsSent.Add(job.Id);
                slot.Worker.Send(new CoordinatorMessage { SampleWork = work });
            }
        }
    }
}
