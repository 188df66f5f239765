using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Optimization;
namespace DistDiffusion.Model.Training;

/// <summary>A node of a <see cref="MicroBatchTree"/>: the micro-batches [First, End) under it.</summary>
public readonly record struct TreeNode(int First, int End)
{
    public bool IsLeaf => End - First == 1;
    public int Leaves => End - First;
    public override string ToString() => $"[{First},{End})";
}

/// <summary>
/// The fixed decomposition of a global batch of B samples into M micro-batches (leaf i holds samples
/// [i*B/M + min(i, B mod M), ...), sizes differing by at most one) and the fixed pairwise tree in which their gradients
/// are added: node [a, b) is the sum left + right of its children [a, m) and [m, b), m = a + ceil((b - a) / 2), in
/// float32, element by element. B and M come from the recipe only, so the gradient of a step has the same bits whether
/// one process computes the root or any number of workers compute a cover of it (<see cref="Cover"/>) and the
/// coordinator adds the nodes up (<see cref="Combine"/>). Immutable.
/// </summary>
public sealed class MicroBatchTree
{
    private readonly int[] _leafStart;

    public MicroBatchTree(int batchSize, int microBatches)
    {
        if (batchSize < 1) throw new ArgumentOutOfRangeException(nameof(batchSize), batchSize, "expected a batch of at least 1 sample");
        if (microBatches < 1 || microBatches > batchSize)
            throw new ArgumentOutOfRangeException(nameof(microBatches), microBatches, $"expected 1..{batchSize} micro-batches for a batch of {batchSize}");
        BatchSize = batchSize;
        _leafStart = new int[microBatches + 1];
        for (var i = 0; i < microBatches; i++)
            _leafStart[i + 1] = _leafStart[i] + batchSize / microBatches + (i < batchSize % microBatches ? 1 : 0);
    }

    /// <summary>The recipe's tree: its micro-batch count, or one micro-batch per sample when the batch is smaller.</summary>
    public static MicroBatchTree For(Recipe recipe) => new(recipe.BatchSize, Math.Min(recipe.MicroBatches, recipe.BatchSize));

    public int BatchSize { get; }
    public int Leaves => _leafStart.Length - 1;
    public TreeNode Root => new(0, Leaves);

    /// <summary>The samples [Start, End) of the global batch under <paramref name="node"/>.</summary>
    public (int Start, int End) Samples(TreeNode node) => (_leafStart[node.First], _leafStart[node.End]);

    public static (TreeNode Left, TreeNode Right) Children(TreeNode node)
    {
        if (node.IsLeaf) throw new ArgumentException($"node {node} is a leaf");
        var mid = node.First + (node.Leaves + 1) / 2;
        return (new TreeNode(node.First, mid), new TreeNode(mid, node.End));
    }

    /// <summary>Whether <paramref name="node"/> is a node of this tree.</summary>
    public bool Contains(TreeNode node)
    {
        var n = Root;
        while (true)
        {
            if (n == node) return true;
            if (n.IsLeaf || node.First < n.First || node.End > n.End) return false;
            var (l, r) = Children(n);
            n = node.End <= l.End ? l : r;
        }
    }

    /// <summary>The fewest tree nodes that exactly cover the leaves [first, end), in leaf order.</summary>
    public IReadOnlyList<TreeNode> Cover(int first, int end)
    {
        if (first < 0 || end > Leaves || first >= end)
            throw new ArgumentOutOfRangeException(nameof(first), $"leaves [{first},{end}): expected a non-empty range within [0,{Leaves})");
        var nodes = new List<TreeNode>();
        Walk(Root);
        return nodes;

        void Walk(TreeNode n)
        {
            if (n.End <= first || n.First >= end) return;
            if (n.First >= first && n.End <= end)
            {
                nodes.Add(n);
                return;
            }
            var (l, r) = Children(n);
            Walk(l);
            Walk(r);
        }
    }

    /// <summary>Contiguous leaf ranges for <paramref name="parts"/> workers, sizes differing by at most one (parts &lt;= leaves).</summary>
    public (int First, int End)[] Split(int parts)
    {
        if (parts < 1 || parts > Leaves)
            throw new ArgumentOutOfRangeException(nameof(parts), parts, $"expected 1..{Leaves} parts");
        var ranges = new (int, int)[parts];
        var start = 0;
        for (var i = 0; i < parts; i++)
        {
            var size = Leaves / parts + (i < Leaves % parts ? 1 : 0);
            ranges[i] = (start, start + size);
            start += size;
        }
        return ranges;
    }

    /// <summary>
    /// The gradient of <paramref name="node"/> [P] from the results at hand: a node's own result when there is one,
    /// otherwise left + right of its children's, recursively. The sum is written into the left operand's buffer; every
    /// other buffer used is handed to <paramref name="release"/>. Throws when a needed leaf is missing.
    /// </summary>
    public static float[] Combine(TreeNode node, IReadOnlyDictionary<TreeNode, float[]> results, Action<float[]> release)
    {
        if (results.TryGetValue(node, out var own)) return own;
        if (node.IsLeaf) throw new InvalidOperationException($"no gradient for micro-batch {node.First}");
        var (l, r) = Children(node);
        var left = Combine(l, results, release);
        var right = Combine(r, results, release);
        VectorMath.AddInPlace(left, right);
        release(right);
        return left;
    }
}
