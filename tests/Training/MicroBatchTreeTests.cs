using DistDiffusion.Model.Optimization;
using DistDiffusion.Model.Training;

namespace DistDiffusion.Tests.Training;

/// <summary>The fixed micro-batch decomposition and addition tree, pinned by value.</summary>
public sealed class MicroBatchTreeTests
{
    [Fact]
    public void LeavesCutTheBatchWithSizesWithinOne()
    {
        var tree = new MicroBatchTree(61, 8);   // 61 = 7 * 8 + 5: five leaves of 8, three of 7
        Assert.Equal(new[] { (0, 8), (8, 16), (16, 24), (24, 32), (32, 40), (40, 47), (47, 54), (54, 61) },
            Enumerable.Range(0, 8).Select(i => tree.Samples(new TreeNode(i, i + 1))).ToArray());
        Assert.Equal((0, 61), tree.Samples(tree.Root));
    }

    [Fact]
    public void ChildrenSplitAtTheCeilingOfTheMiddle()
    {
        Assert.Equal((new TreeNode(0, 4), new TreeNode(4, 8)), MicroBatchTree.Children(new TreeNode(0, 8)));
        Assert.Equal((new TreeNode(0, 3), new TreeNode(3, 5)), MicroBatchTree.Children(new TreeNode(0, 5)));
        Assert.Throws<ArgumentException>(() => MicroBatchTree.Children(new TreeNode(2, 3)));
    }

    [Theory]
    [InlineData(0, 3, "[0,2) [2,3)")]
    [InlineData(3, 6, "[3,4) [4,6)")]
    [InlineData(6, 8, "[6,8)")]
    [InlineData(0, 8, "[0,8)")]
    [InlineData(1, 7, "[1,2) [2,4) [4,6) [6,7)")]
    public void CoverIsTheFewestNodes(int first, int end, string expected) =>
        Assert.Equal(expected, string.Join(" ", new MicroBatchTree(64, 8).Cover(first, end)));

    [Fact]
    public void ContainsOnlyTreeNodes()
    {
        var tree = new MicroBatchTree(64, 8);
        Assert.True(tree.Contains(new TreeNode(4, 6)));
        Assert.True(tree.Contains(new TreeNode(0, 8)));
        Assert.False(tree.Contains(new TreeNode(1, 3)));
        Assert.False(tree.Contains(new TreeNode(0, 9)));
    }

    [Fact]
    public void CombiningAnyCoverGivesTheSameBitsAsTheWholeTree()
    {
        // Values whose float32 sum depends on the order: only the tree's fixed order repeats.
        var tree = new MicroBatchTree(64, 8);
        float[] first = [1e8f, -1e8f, 1f, 1f, 1e8f, -1e8f, 1f, 1f];
        var leaves = Enumerable.Range(0, 8).ToDictionary(i => new TreeNode(i, i + 1), i => new[] { first[i], 0.1f * (i + 1) });
        float[] Copy(float[] v) => (float[])v.Clone();
        var whole = MicroBatchTree.Combine(tree.Root, leaves.ToDictionary(p => p.Key, p => Copy(p.Value)), _ => { });
        Assert.Equal(4f, whole[0]);   // (1e8 - 1e8) + (1 + 1), twice
        foreach (var parts in new[] { 2, 3, 5, 8 })
        {
            var results = new Dictionary<TreeNode, float[]>();
            foreach (var (a, b) in tree.Split(parts))
                foreach (var node in tree.Cover(a, b))
                    results[node] = MicroBatchTree.Combine(node, leaves.ToDictionary(p => p.Key, p => Copy(p.Value)), _ => { });
            Assert.Equal(whole, MicroBatchTree.Combine(tree.Root, results, _ => { }));
        }
        // The left-to-right sum is another number: the tree is what makes worker counts agree.
        var sequential = new float[2];
        foreach (var v in leaves.OrderBy(p => p.Key.First).Select(p => p.Value)) VectorMath.AddInPlace(sequential, v);
        Assert.Equal(2f, sequential[0]);   // 1e8 + 2 rounds back to 1e8 in float32
    }

    [Theory]
    [InlineData(0, 8)]
    [InlineData(8, 9)]
    public void BadSizesAreRefused(int batch, int leaves) =>
        Assert.Throws<ArgumentOutOfRangeException>(() => new MicroBatchTree(batch, leaves));
}
