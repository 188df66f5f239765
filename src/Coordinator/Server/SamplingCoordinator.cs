using System.Threading.Channels;
using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;
using Google.Protobuf;
using Microsoft.Extensions.Logging;

namespace DistDiffusion.Coordinator.Server;

/// <summary>
/// Fans sampling requests out over the connected workers. A request becomes batches of chains
/// (samples first..first+count-1); idle workers pull the next batch of the oldest request (at most two
/// outstanding each), so each worker gets work in proportion to its speed. Batches of a worker that leaves
/// go back to the front of the queue. Results are kept per batch and forwarded in sample order.
/// Sample i depends only on (seed, i), so the split never changes the samples.
/// </summary>
public sealed class SamplingCoordinator(ILogger<SamplingCoordinator> log)
{
    private const int OutstandingPerWorker = 2;
    private const int MaxBatchBytes = 900 * 1024;   // a SampleOutput stays under the 1 MiB message limit
    private readonly object _gate = new();
    private readonly List<Slot> _workers = [];
    private readonly List<Job> _jobs = [];
    private long _nextJob;

    private sealed class Slot(WorkerConnection worker)
    {
        public WorkerConnection Worker { get; } = worker;
        public List<(Job Job, int Batch)> Outstanding { get; } = [];
        public HashSet<ulong> WeightsSent { get; } = [];
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
    }

    public int WorkerCount
    {
        get { lock (_gate) return _workers.Count; }
    }

    public void AddWorker(WorkerConnection w)
    {
        lock (_gate)
        {
            _workers.Add(new Slot(w));
            Dispatch();
        }
    }

    public void RemoveWorker(WorkerConnection w)
    {
        lock (_gate)
        {
            var slot = _workers.Find(s => s.Worker == w);
            if (slot is null) return;
            _workers.Remove(slot);
            foreach (var (job, batch) in slot.Outstanding)
            {
                if (job.Results[batch] is not null) continue;
                job.Pending.AddFirst(batch);
                log.LogInformation("Sample job {Job} batch {Batch} of {Worker} goes back to the queue", job.Id, batch, w.Id);
            }
            Dispatch();
        }
    }

    /// <summary>A batch came back from a worker (validated here: it must be one this worker holds).</summary>
    public void OnOutput(WorkerConnection w, SampleOutput output)
    {
        lock (_gate)
        {
            var slot = _workers.Find(s => s.Worker == w);
            var job = _jobs.Find(j => j.Id == output.JobId);
            var held = slot?.Outstanding.FindIndex(o => o.Job == job && o.Batch == (int)output.Batch) ?? -1;
            if (slot is null || job is null || held < 0) return;   // cancelled, or already given to another worker
            slot.Outstanding.RemoveAt(held);
            var batch = (int)output.Batch;
            var (first, count) = job.Batches[batch];
            if (output.Error.Length > 0 || output.FirstIndex != first || output.Count != count || output.Samples.Length != count * job.SampleElements * 4)
            {
                var why = output.Error.Length > 0 ? output.Error : $"batch {batch} came back with {output.Samples.Length} bytes for samples {output.FirstIndex}..+{output.Count}";
                if (++job.Failures[batch] >= 3)
                {
                    job.Changes.Writer.TryWrite($"sample batch {batch} failed 3 times: {why}");
                }
                else
                {
                    log.LogWarning("Sample job {Job} batch {Batch} failed on {Worker}: {Error}; retrying", job.Id, batch, w.Id, why);
                    job.Pending.AddFirst(batch);
                }
            }
            else
            {
                job.Results[batch] = output;
                job.Changes.Writer.TryWrite(null);
            }
            Dispatch();
        }
    }


    /// <summary>Starts a job; the caller reads <see cref="Job.Changes"/> and must call <see cref="End"/>.</summary>
    internal Job Start(SampleWork template, WeightsSnapshot weights, long[] sampleShape, int frames, int maxBatch)
    {
        var elements = sampleShape.Aggregate(1L, (a, b) => a * b);
        var perSample = elements * 4 * (1 + frames);
        // Small enough to give every worker two batches (and an early first result), within the message limit.
        var spread = (template.Count + 2 * Math.Max(1, WorkerCount) - 1) / (2 * Math.Max(1, WorkerCount));
        var batchSize = (uint)Math.Clamp(Math.Min(MaxBatchBytes / Math.Max(1, perSample), spread), 1, maxBatch);
        var batches = new List<(uint, uint)>();
        for (uint first = 0; first < template.Count; first += batchSize)
            batches.Add((first, Math.Min(batchSize, template.Count - first)));
        lock (_gate)
        {
            var job = new Job((ulong)Interlocked.Increment(ref _nextJob), template, weights, [.. batches]) { SampleElements = (int)elements };
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
                if (slot.Outstanding.RemoveAll(o => o.Job == job) > 0)
                    slot.Worker.Send(new CoordinatorMessage { CancelSampleWork = new CancelSampleWork { JobId = job.Id } });
            }
            job.Changes.Writer.TryComplete();
            Dispatch();
        }
    }

    private void Dispatch()
    {
        foreach (var slot in _workers.OrderBy(s => s.Outstanding.Count))
        {
            while (slot.Outstanding.Count < OutstandingPerWorker)
            {
                var job = _jobs.Find(j => j.Pending.Count > 0);
                if (job is null) return;
                var batch = job.Pending.First!.Value;
                job.Pending.RemoveFirst();
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
                slot.Outstanding.Add((job, batch));
                slot.Worker.Send(new CoordinatorMessage { SampleWork = work });
            }
        }
    }
}
