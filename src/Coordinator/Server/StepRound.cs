namespace DistDiffusion.Coordinator.Server;

/// <summary>Why a pushed slice gradient was not taken into the step.</summary>
internal enum SliceRejection
{
    None,
    /// <summary>For another step (late, or from before a restart).</summary>
    OtherStep,
    /// <summary>No such slice in this step.</summary>
    NoSuchSlice,
    /// <summary>The slice is held by another worker now (it was reassigned).</summary>
    NotOwner,
    /// <summary>The slice is already in.</summary>
    Duplicate,
}

/// <summary>
/// The slices of one synchronous step: how the global batch is cut, which worker holds each slice and until when, and
/// which gradients have come back. It decides; it sends nothing (the training loop does the I/O), and it reads time
/// from a <see cref="TimeProvider"/>, so the step protocol is unit-tested without processes or sleeps.
/// <para>Protocol: every slice is assigned at the start to one live worker; a gradient is accepted once, from the
/// worker holding the slice, for this step; a worker that leaves or misses its deadline loses its unfinished slices,
/// which are reassigned (to the least-loaded live worker) or wait for one to join; the step is complete when every
/// slice is in, and the slices are summed in slice order, whoever computed them and whenever they arrived.</para>
/// </summary>
internal sealed class StepRound
{
    private readonly WorkerConnection?[] _owners;
    private readonly DateTimeOffset[] _deadlines;
    private readonly SliceGradient?[] _results;
    private readonly List<(string Worker, SliceFault Fault)>?[] _refusals;
    private readonly TimeProvider _clock;

    public StepRound(ulong step, ulong version, int batchSize, int sliceCount, TimeSpan deadline, TimeProvider clock)
    {
        if (sliceCount < 1 || sliceCount > batchSize)
            throw new ArgumentOutOfRangeException(nameof(sliceCount), sliceCount, $"expected 1..{batchSize} slices for a batch of {batchSize}");
        Step = step;
        Version = version;
        Deadline = deadline;
        _clock = clock;
        Bounds = SliceBounds(batchSize, sliceCount);
        _owners = new WorkerConnection?[sliceCount];
        _deadlines = new DateTimeOffset[sliceCount];
        _results = new SliceGradient?[sliceCount];
        _refusals = new List<(string, SliceFault)>?[sliceCount];
    }

    public ulong Step { get; }
    public ulong Version { get; }
    public TimeSpan Deadline { get; }
    public (int Start, int End)[] Bounds { get; }
    public int SliceCount => _owners.Length;
    public bool IsComplete => _results.All(r => r is not null);

    public WorkerConnection? OwnerOf(int slice) => _owners[slice];
    public bool IsDone(int slice) => _results[slice] is not null;

    /// <summary>Gives <paramref name="slice"/> to <paramref name="worker"/>, due one deadline from now.</summary>
    public void Assign(int slice, WorkerConnection worker)
    {
        if (_results[slice] is not null) throw new InvalidOperationException($"slice {slice} of step {Step} is already in");
        _owners[slice] = worker;
        _deadlines[slice] = _clock.GetUtcNow() + Deadline;
    }

    /// <summary>Slices <paramref name="worker"/> holds and has not returned.</summary>
    public List<int> Unfinished(WorkerConnection worker) =>
        Enumerable.Range(0, SliceCount).Where(k => _owners[k] == worker && _results[k] is null).ToList();

    /// <summary>Slices not returned whose holder is gone (or that wait for a worker).</summary>
    public List<int> Orphans(IReadOnlyCollection<WorkerConnection> live) =>
        Enumerable.Range(0, SliceCount).Where(k => _results[k] is null && (_owners[k] is not { } o || !live.Contains(o))).ToList();

    /// <summary>The slice waits for a worker (none is live).</summary>
    public void Release(int slice) => _owners[slice] = null;

    /// <summary>Whether <paramref name="worker"/> holds a slice past its deadline.</summary>
    public bool IsLate(WorkerConnection worker)
    {
        var now = _clock.GetUtcNow();
        return Enumerable.Range(0, SliceCount).Any(k => _owners[k] == worker && _results[k] is null && now > _deadlines[k]);
    }

    /// <summary>The live worker with the fewest unfinished slices (the first such in <paramref name="live"/>).</summary>
    public WorkerConnection LeastLoaded(IReadOnlyList<WorkerConnection> live) =>
        live.Count == 0 ? throw new InvalidOperationException("no live worker") : live.MinBy(w => Unfinished(w).Count)!;

    /// <summary>Whether a pushed gradient answers a slice of this step that its sender holds and that is not in yet.</summary>
    public SliceRejection Validate(SliceGradient gradient)
    {
        if (gradient.Step != Step) return SliceRejection.OtherStep;
        if (gradient.Slice >= SliceCount) return SliceRejection.NoSuchSlice;
        if (_results[gradient.Slice] is not null) return SliceRejection.Duplicate;
        if (_owners[gradient.Slice] != gradient.Worker) return SliceRejection.NotOwner;
        return SliceRejection.None;
    }

    /// <summary>Takes a pushed gradient into the step, or says why not (the caller acknowledges it either way).</summary>
    public SliceRejection Accept(SliceGradient gradient)
    {
        var rejection = Validate(gradient);
        if (rejection == SliceRejection.None) _results[gradient.Slice] = gradient;
        return rejection;
    }

    /// <summary>
    /// Records that <paramref name="worker"/>'s result for <paramref name="slice"/> was refused for <paramref name="fault"/>
    /// (the caller then drops the worker, which reassigns the slice); returns how many different connections have now
    /// had this slice refused for this fault — two independent computations agreeing on a non-finite gradient is divergence.
    /// </summary>
    public int Refuse(int slice, WorkerConnection worker, SliceFault fault)
    {
        var list = _refusals[slice] ??= [];
        if (!list.Contains((worker.Id, fault))) list.Add((worker.Id, fault));
        return list.Count(r => r.Fault == fault);
    }

    /// <summary>
    /// The step's gradient: the slices summed in slice order (so the result does not depend on who computed which slice
    /// or when it arrived), the union of their presence bitmaps and their summed loss. The first slice's buffer holds
    /// the sum; the others are handed to <paramref name="release"/> once added.
    /// </summary>
    public (float[] Total, byte[] Present, double Loss) Sum(Action<float[]> release)
    {
        if (!IsComplete) throw new InvalidOperationException($"step {Step}: {_results.Count(r => r is null)} slices are not in");
        var total = _results[0]!.Values;
        var present = _results[0]!.Present.ToArray();
        var loss = _results[0]!.Loss;
        for (var k = 1; k < SliceCount; k++)
        {
            var part = _results[k]!;
            Add(total, part.Values);
            for (var b = 0; b < present.Length; b++) present[b] |= part.Present[b];
            loss += part.Loss;
            release(part.Values);
        }
        return (total, present, loss);
    }

    /// <summary>What the stream handlers check a push against (immutable).</summary>
    public StepSnapshot Snapshot() => new(Step, Version,
        Bounds.Select(b => b.End - b.Start).ToArray(), _owners.Select(o => o?.Id).ToArray(), _results.Select(r => r is not null).ToArray());

    /// <summary>Contiguous slices of a batch of n over k workers, sizes differing by at most one.</summary>
    internal static (int Start, int End)[] SliceBounds(int n, int k)
    {
        var bounds = new (int, int)[k];
        var start = 0;
        for (var i = 0; i < k; i++)
        {
            var size = n / k + (i < n % k ? 1 : 0);
            bounds[i] = (start, start + size);
            start += size;
        }
        return bounds;
    }

    private static void Add(float[] total, float[] part)
    {
        var t = System.Runtime.InteropServices.MemoryMarshal.Cast<float, System.Numerics.Vector<float>>(total.AsSpan());
        var p = System.Runtime.InteropServices.MemoryMarshal.Cast<float, System.Numerics.Vector<float>>(part.AsSpan());
        for (var i = 0; i < t.Length; i++) t[i] += p[i];
        for (var i = t.Length * System.Numerics.Vector<float>.Count; i < total.Length; i++) total[i] += part[i];
    }
}
