using DistDiffusion.Coordinator.Workers;
using DistDiffusion.Model.Training;

namespace DistDiffusion.Coordinator.Training;

/// <summary>Why a pushed slice gradient was not taken into the step.</summary>
internal enum SliceRejection
{
    None,
    /// <summary>For another step (late, or from before a restart).</summary>
    OtherStep,
    /// <summary>No such slice in this step.</summary>
    NoSuchSlice,
    /// <summary>The sender does not hold the slice (it was taken from it).</summary>
    NotOwner,
    /// <summary>The slice is already in (another holder was first, or a backup covered it).</summary>
    Duplicate,
}

/// <summary>
/// The slices of one synchronous step. The global batch is the recipe's fixed micro-batch tree
/// (<see cref="MicroBatchTree"/>); the live workers get contiguous runs of micro-batches, and each run is sent as the
/// fewest tree nodes that cover it: a slice is one such node. The round decides who holds which slice, until when, and
/// which results are in; it sends nothing (the training loop does the I/O) and reads time from a
/// <see cref="TimeProvider"/>, so the protocol is unit-tested without processes or sleeps.
/// <para>Protocol: a slice may have several holders — its first, a backup given a copy when the first is slow next to
/// the step's other slices, or a replacement when a holder leaves or misses its deadline. The first result from any
/// holder is taken; later ones are duplicates (whose checksums the loop compares: the bits must agree). A slow slice
/// that is not a single micro-batch may instead be covered by its two children, given to two idle workers. The step is
/// complete when the tree's root can be assembled from the results; the gradient is the tree's fixed sum, whoever
/// computed which node and in whatever order they arrived, so it has the same bits for any number of workers.</para>
/// </summary>
internal sealed class StepRound
{
    private sealed class Slice(TreeNode node)
    {
        public TreeNode Node { get; } = node;
        public List<(WorkerConnection Worker, DateTimeOffset Since, DateTimeOffset Due)> Holders { get; } = [];
        public SliceGradient? Result { get; set; }
        public DateTimeOffset? ArrivedAt { get; set; }
        public List<(string Worker, SliceFault Fault)>? Refusals { get; set; }
    }

    private readonly List<Slice> _slices = [];
    private readonly MicroBatchTree _tree;
    private readonly TimeProvider _clock;
    private readonly DateTimeOffset _started;

    /// <param name="parts">How many workers share the step (at most the tree's leaves): part i gets the i-th run of micro-batches.</param>
    public StepRound(ulong step, ulong version, MicroBatchTree tree, int parts, TimeSpan deadline, TimeProvider clock)
    {
        if (parts < 1 || parts > tree.Leaves)
            throw new ArgumentOutOfRangeException(nameof(parts), parts, $"expected 1..{tree.Leaves} parts for a tree of {tree.Leaves} micro-batches");
        Step = step;
        Version = version;
        Deadline = deadline;
        _tree = tree;
        _clock = clock;
        _started = clock.GetUtcNow();
        var ranges = tree.Split(parts);
        Parts = new List<int>[parts];
        for (var i = 0; i < parts; i++)
        {
            Parts[i] = [];
            foreach (var node in tree.Cover(ranges[i].First, ranges[i].End))
            {
                Parts[i].Add(_slices.Count);
                _slices.Add(new Slice(node));
            }
        }
    }

    public ulong Step { get; }
    public ulong Version { get; }
    public TimeSpan Deadline { get; }
    /// <summary>Slice numbers of each part (give all of part i to one worker).</summary>
    public List<int>[] Parts { get; }
    public int SliceCount => _slices.Count;
    public bool IsComplete => Covered(_tree.Root);

    public TreeNode NodeOf(int slice) => _slices[slice].Node;
    /// <summary>The samples [Start, End) of the global batch that <paramref name="slice"/> holds.</summary>
    public (int Start, int End) Bounds(int slice) => _tree.Samples(_slices[slice].Node);
    public IEnumerable<WorkerConnection> HoldersOf(int slice) => _slices[slice].Holders.Select(h => h.Worker);
    /// <summary>Whether the slice needs nothing more: its result is in, or a backup's children cover it.</summary>
    public bool IsDone(int slice) => Covered(_slices[slice].Node);

    /// <summary>Gives <paramref name="slice"/> to <paramref name="worker"/> (one more holder), due one deadline from now.</summary>
    public void Assign(int slice, WorkerConnection worker)
    {
        var s = _slices[slice];
        if (IsDone(slice)) throw new InvalidOperationException($"slice {slice} of step {Step} is already in");
        if (s.Holders.Any(h => h.Worker == worker)) throw new InvalidOperationException($"{worker.Id} already holds slice {slice} of step {Step}");
        var now = _clock.GetUtcNow();
        s.Holders.Add((worker, now, now + Deadline));
    }

    /// <summary>Takes every slice away from <paramref name="worker"/> (it left or was dropped); returns the slices left with no holder.</summary>
    public List<int> Drop(WorkerConnection worker)
    {
        var orphaned = new List<int>();
        for (var k = 0; k < _slices.Count; k++)
            if (_slices[k].Holders.RemoveAll(h => h.Worker == worker) > 0 && _slices[k].Holders.Count == 0 && !IsDone(k))
                orphaned.Add(k);
        return orphaned;
    }

    /// <summary>Slices <paramref name="worker"/> holds that are not done.</summary>
    public List<int> Unfinished(WorkerConnection worker) =>
        Enumerable.Range(0, _slices.Count).Where(k => _slices[k].Holders.Any(h => h.Worker == worker) && !IsDone(k)).ToList();

    /// <summary>Slices not done whose holders are all gone (or that wait for a worker).</summary>
    public List<int> Orphans(IReadOnlyCollection<WorkerConnection> live) =>
        Enumerable.Range(0, _slices.Count).Where(k => !IsDone(k) && !_slices[k].Holders.Any(h => live.Contains(h.Worker)) && !ChildrenHeld(k, live)).ToList();

    /// <summary>Whether <paramref name="worker"/> holds a slice past its deadline.</summary>
    public bool IsLate(WorkerConnection worker)
    {
        var now = _clock.GetUtcNow();
        return Enumerable.Range(0, _slices.Count).Any(k => !IsDone(k) && _slices[k].Holders.Any(h => h.Worker == worker && now > h.Due));
    }

    /// <summary>The live worker with the fewest unfinished slices (the first such in <paramref name="live"/>).</summary>
    public WorkerConnection LeastLoaded(IReadOnlyList<WorkerConnection> live) =>
        live.Count == 0 ? throw new InvalidOperationException("no live worker") : live.MinBy(w => Unfinished(w).Count)!;

    /// <summary>
    /// Slow slices that deserve a copy: not done, no copy given yet, held longer than <paramref name="factor"/> times the
    /// median time the step's finished slices took (per sample, scaled to this slice's size) and at least
    /// <paramref name="minimum"/>. Empty until some slice is in.
    /// </summary>
    public List<int> Straggling(double factor, TimeSpan minimum)
    {
        var finished = _slices.Where(s => s.Result is not null && s.ArrivedAt is not null).ToList();
        if (finished.Count == 0) return [];
        var perSample = finished.Select(s =>
        {
            var (a, b) = _tree.Samples(s.Node);
            return (s.ArrivedAt!.Value - s.Holders.Select(h => h.Since).DefaultIfEmpty(_started).Min()).TotalSeconds / Math.Max(1, b - a);
        }).Order().ToList();
        var median = perSample[perSample.Count / 2];
        var now = _clock.GetUtcNow();
        var slow = new List<int>();
        for (var k = 0; k < _slices.Count; k++)
        {
            var s = _slices[k];
            if (IsDone(k) || s.Holders.Count != 1 || HasChildSlices(k)) continue;
            var (a, b) = _tree.Samples(s.Node);
            var held = (now - s.Holders[0].Since).TotalSeconds;
            if (held > factor * median * (b - a) && held > minimum.TotalSeconds) slow.Add(k);
        }
        return slow;
    }

    /// <summary>Whether <paramref name="slice"/> was given a copy or split because it was slow (or is a copy itself).</summary>
    public bool HadBackup(int slice) => _slices[slice].Holders.Count > 1 || HasChildSlices(slice) || _slices[slice].Node != _tree.Root && _slices.Take(slice).Any(s => s.Node.First <= _slices[slice].Node.First && s.Node.End >= _slices[slice].Node.End);

    /// <summary>Adds the two children of <paramref name="slice"/> as slices of their own (for two backups); returns their numbers.</summary>
    public (int Left, int Right) Split(int slice)
    {
        var node = _slices[slice].Node;
        var (l, r) = MicroBatchTree.Children(node);
        _slices.Add(new Slice(l));
        _slices.Add(new Slice(r));
        return (_slices.Count - 2, _slices.Count - 1);
    }

    /// <summary>Whether a pushed gradient answers a slice of this step that its sender holds and that is not in yet.</summary>
    public SliceRejection Validate(SliceGradient gradient) =>
        Judge(Step, _slices.Count, gradient.Step, gradient.Slice, IsDone, k => _slices[k].Holders.Any(h => h.Worker == gradient.Worker));

    /// <summary>
    /// The one rule for a pushed slice gradient, in this order: it is for the round's step, names one of its slices, that
    /// slice is not in yet, and its sender holds it. The loop applies it to the live round (<see cref="Validate"/>); the
    /// stream handlers apply it to the round's last <see cref="Snapshot"/> (<see cref="StepSnapshot.Judge"/>) to refuse
    /// or ignore a push before its payload is received.
    /// </summary>
    public static SliceRejection Judge(ulong roundStep, int sliceCount, ulong step, uint slice, Func<int, bool> isDone, Func<int, bool> isHolder)
    {
        if (step != roundStep) return SliceRejection.OtherStep;
        if (slice >= sliceCount) return SliceRejection.NoSuchSlice;
        if (isDone((int)slice)) return SliceRejection.Duplicate;
        if (!isHolder((int)slice)) return SliceRejection.NotOwner;
        return SliceRejection.None;
    }

    /// <summary>Takes a pushed gradient into the step, or says why not (the caller acknowledges it either way).</summary>
    public SliceRejection Accept(SliceGradient gradient)
    {
        var rejection = Validate(gradient);
        if (rejection == SliceRejection.None)
        {
            _slices[(int)gradient.Slice].Result = gradient;
            _slices[(int)gradient.Slice].ArrivedAt = _clock.GetUtcNow();
        }
        return rejection;
    }

    /// <summary>The accepted result of <paramref name="slice"/> (null: none; a slice covered by its children has none).</summary>
    public SliceGradient? ResultOf(int slice) => _slices[slice].Result;

    /// <summary>
    /// Records that <paramref name="worker"/>'s result for <paramref name="slice"/> was refused for <paramref name="fault"/>
    /// (the caller then drops the worker, which reassigns the slice); returns how many different connections have now
    /// had this slice refused for this fault — two independent computations agreeing on a non-finite gradient is divergence.
    /// </summary>
    public int Refuse(int slice, WorkerConnection worker, SliceFault fault)
    {
        var list = _slices[slice].Refusals ??= [];
        if (!list.Contains((worker.Id, fault))) list.Add((worker.Id, fault));
        return list.Count(r => r.Fault == fault);
    }

    /// <summary>
    /// The step's gradient: the tree's fixed sum of the results (so it does not depend on who computed which node or
    /// when it arrived), the union of the presence bitmaps used and their summed loss. The sum is written into one
    /// result's buffer; every other result buffer is handed to <paramref name="release"/>.
    /// </summary>
    public (float[] Total, byte[] Present, double Loss) Sum(Action<float[]> release)
    {
        if (!IsComplete) throw new InvalidOperationException($"step {Step}: the slices in do not cover the batch yet");
        var used = new Dictionary<TreeNode, SliceGradient>();
        Collect(_tree.Root);
        var total = MicroBatchTree.Combine(_tree.Root, used.ToDictionary(p => p.Key, p => p.Value.Values), release);
        byte[]? present = null;
        var loss = 0.0;
        foreach (var g in used.OrderBy(p => p.Key.First).Select(p => p.Value))
        {
            present ??= new byte[g.Present.Length];
            for (var b = 0; b < present.Length; b++) present[b] |= g.Present[b];
            loss += g.Loss;
        }
        foreach (var s in _slices)
            if (s.Result is { } r && !used.ContainsValue(r)) release(r.Values);
        return (total, present!, loss);

        void Collect(TreeNode node)
        {
            if (_slices.FirstOrDefault(s => s.Node == node && s.Result is not null) is { } own)
            {
                used[node] = own.Result!;
                return;
            }
            var (l, r) = MicroBatchTree.Children(node);
            Collect(l);
            Collect(r);
        }
    }

    /// <summary>What the stream handlers check a push against (immutable).</summary>
    public StepSnapshot Snapshot() => new(Step, Version,
        Enumerable.Range(0, _slices.Count).Select(k => Bounds(k).End - Bounds(k).Start).ToArray(),
        _slices.Select(s => s.Holders.Select(h => h.Worker.Id).ToArray()).ToArray(),
        Enumerable.Range(0, _slices.Count).Select(IsDone).ToArray());

    private bool Covered(TreeNode node)
    {
        if (_slices.Any(s => s.Node == node && s.Result is not null)) return true;
        if (node.IsLeaf) return false;
        var (l, r) = MicroBatchTree.Children(node);
        return Covered(l) && Covered(r);
    }

    private bool HasChildSlices(int slice)
    {
        var node = _slices[slice].Node;
        if (node.IsLeaf) return false;
        var (l, r) = MicroBatchTree.Children(node);
        return _slices.Any(s => s.Node == l || s.Node == r);
    }

    private bool ChildrenHeld(int slice, IReadOnlyCollection<WorkerConnection> live)
    {
        var node = _slices[slice].Node;
        if (node.IsLeaf) return false;
        var (l, r) = MicroBatchTree.Children(node);
        bool Held(TreeNode n) => _slices.Any(s => s.Node == n && (s.Result is not null || s.Holders.Any(h => live.Contains(h.Worker))));
        return Held(l) && Held(r);
    }
}

/// <summary>
/// The checksums of the slices taken in the last few steps, so that a copy computed elsewhere (a straggler's late
/// result, a verification) can be compared after its step is over. The loop's thread owns it.
/// </summary>
internal sealed class RecentResults
{
    public const int Steps = 8;
    private readonly Dictionary<(ulong Step, uint Slice), (ulong? Checksum, string Worker)> _taken = [];

    /// <summary>Records the slice taken from <paramref name="worker"/>; <paramref name="checksum"/> is null when no comparison was expected (a shared-memory push without copies).</summary>
    public void Record(ulong step, uint slice, ulong? checksum, string worker)
    {
        _taken[(step, slice)] = (checksum, worker);
        if (step >= Steps)
            foreach (var old in _taken.Keys.Where(k => k.Step <= step - Steps).ToList()) _taken.Remove(old);
    }

    public (ulong? Checksum, string Worker)? Lookup(ulong step, uint slice) => _taken.TryGetValue((step, slice), out var r) ? r : null;
}
