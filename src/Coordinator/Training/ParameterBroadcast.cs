using DistDiffusion.Coordinator.Sampling;
using DistDiffusion.Coordinator.Workers;
using DistDiffusion.Model.Training;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;

namespace DistDiffusion.Coordinator.Training;

/// <summary>
/// The coordinator's parameters as workers receive them: the current version's bytes and header (with its checksum),
/// sent to a worker through its shared-memory region or as header + chunks on its stream, and the weights snapshots
/// that sampling requests pin. Owned by the training loop (one thread); other threads may read <see cref="Header"/>.
/// <para>Two byte buffers alternate by version: a worker may still be reading version v (its chunks queued, or its
/// region filled from them) while v + 1 is published. Both are reused for the whole run.</para>
/// </summary>
internal sealed class ParameterBroadcast
{
    private readonly ParameterVector _vector;
    private readonly ParameterVector? _ema;
    private readonly byte[][] _buffers;
    private readonly Dictionary<bool, WeightsSnapshot> _snapshots = [];
    private readonly Lock _gate = new();
    private byte[] _bytes = [];
    private ulong _step;
    private TensorHeader? _header;

    public ParameterBroadcast(ParameterVector vector, ParameterVector? ema)
    {
        _vector = vector;
        _ema = ema;
        _buffers = [new byte[vector.Elements * 4], new byte[vector.Elements * 4]];
    }

    /// <summary>The version workers are sent (the number of updates applied).</summary>
    public ulong Version { get; private set; }

    /// <summary>
    /// The current version's header for the stream, with the checksum that identifies the parameters. Hashed on first
    /// use per version: workers on shared memory never need it, and a step should not wait for a hash nobody reads.
    /// Safe from other threads (tests read it while the loop runs).
    /// </summary>
    public TensorHeader Header
    {
        get
        {
            lock (_gate) return _header ??= TensorTransport.Header(_bytes, DType.Float32, _vector.Elements, _step, Version);
        }
    }

    /// <summary>Reads the network's parameters as <paramref name="version"/> (after an update, or at start-up).</summary>
    public void Publish(ulong version, ulong step)
    {
        _vector.ReadValues(BufferFor(version));
        Published(version, step);
    }

    /// <summary>
    /// The buffer <paramref name="version"/>'s bytes go into [Elements * 4] (not the current version's, which workers may
    /// still be reading): an update can write the new parameters there as it computes them, then call <see cref="Published"/>.
    /// </summary>
    public byte[] BufferFor(ulong version) => _buffers[(int)(version % 2)];

    /// <summary>Makes <paramref name="version"/> current, its bytes already written into <see cref="BufferFor"/>.</summary>
    public void Published(ulong version, ulong step)
    {
        var bytes = BufferFor(version);
        lock (_gate) (Version, _step, _bytes, _header) = (version, step, bytes, null);
    }

    /// <summary>
    /// The current parameters to one worker: into its shared-memory region (one memcpy, as one write of the region's
    /// sequence lock; the header with that sequence on the stream) or as header + chunks on the stream. The region is
    /// written only when the worker has read the last parameters written there, which <paramref name="regionRead"/>
    /// says: a worker reads its region when it takes the header from its stream, in order, so one still busy with an
    /// assignment of an earlier step (a verification copy, a slice a backup took over) may not have taken that step's
    /// header yet; overwriting the region under it would make that header's sequence check fail and drop the worker.
    /// Such a worker gets these parameters on the stream instead.
    /// </summary>
    public void SendTo(WorkerConnection worker, bool regionRead)
    {
        if (worker.SharedMemory is { } segment && regionRead)
        {
            var sequence = segment.Write(SharedRegion.Parameters, _bytes);
            worker.Send(new CoordinatorMessage { Parameters = TensorTransport.SharedHeader(_bytes.Length, DType.Float32, _vector.Elements, _step, Version, sequence) });
        }
        else
        {
            var header = Header;
            worker.Send(new CoordinatorMessage { Parameters = header });
            foreach (var chunk in TensorTransport.Chunks(_bytes, header.Step, Version))
                worker.Send(new CoordinatorMessage { ParametersChunk = chunk });
        }
        worker.Schedule.ParameterVersion = Version;
    }

    /// <summary>
    /// Weights to sample with at the current version (EMA when preferred and kept, else raw), made once per version and
    /// kind; the caller has brought the EMA up to date. The bytes are a copy: the live buffers are reused.
    /// </summary>
    public WeightsSnapshot Snapshot(bool preferEma, ulong step)
    {
        var ema = preferEma && _ema is not null;
        if (_snapshots.TryGetValue(ema, out var snapshot) && snapshot.Version == Version) return snapshot;
        var bytes = ema ? _ema!.ReadValues() : _bytes.ToArray();
        var header = TensorTransport.Header(bytes, DType.Float32, _vector.Elements, step, Version);
        snapshot = new WeightsSnapshot((Version << 1) | (ema ? 1UL : 0UL), Version, ema, bytes, header);
        _snapshots[ema] = snapshot;
        return snapshot;
    }
}
