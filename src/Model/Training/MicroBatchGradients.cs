using System.Collections.Concurrent;
using System.Runtime.InteropServices;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Networks;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Training;

/// <summary>The gradient of one tree node: which parameters it touched (bit i of byte i/8) and its summed loss.</summary>
public readonly record struct NodeGradient(byte[] Present, double Loss);

/// <summary>
/// Computes the gradient of a <see cref="MicroBatchTree"/> node the one way every process does: each micro-batch on its
/// own (forward and backward of L_simple over its samples, Algorithm 1), then the micro-batch gradients added in the
/// tree's fixed order. `coordinator train` computes the root with it, a worker the nodes it is given, so their bits agree.
/// <para>Pinned for that: libtorch's CPU kernels give other bits on 1 and 2 threads for convolutions and group norm
/// (the U-Net; the MLP happens not to care), so each micro-batch is computed with one intra-op thread, always (the
/// thread stays at one afterwards: see <see cref="TorchRuntime.UseIntraOpThreads"/>). A process
/// with more threads uses them across micro-batches instead: one replica of the network per thread, each computing its
/// share of the leaves, with parameters copied from the primary network when their version changes.</para>
/// </summary>
public sealed class MicroBatchGradients : IDisposable
{
    private readonly TrainingStep _step;
    private readonly Device _device;
    private readonly DenoiserNetwork[] _replicas;          // [0] is the caller's network (not owned)
    private readonly ParameterVector[] _vectors;
    private readonly ConcurrentBag<float[]> _buffers = [];
    private float[]? _values;
    private long _syncedVersion = long.MinValue;

    /// <param name="threads">Micro-batches computed at once (CPU); each uses one intra-op thread. 1 on CUDA.</param>
    public MicroBatchGradients(Recipe recipe, DenoiserNetwork network, TrainingStep step, Device device, int threads)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(threads, 1);
        Tree = MicroBatchTree.For(recipe);
        _step = step;
        _device = device;
        var count = device.type == DeviceType.CPU ? Math.Min(threads, Tree.Leaves) : 1;
        _replicas = new DenoiserNetwork[count];
        _replicas[0] = network;
        for (var r = 1; r < count; r++)
            _replicas[r] = ModelFactory.Network(recipe, device, training: true);
        _vectors = _replicas.Select(ParameterVector.Of).ToArray();
        Elements = _vectors[0].Elements;
    }

    public MicroBatchTree Tree { get; }
    public long Elements { get; }
    /// <summary>Networks computing micro-batches at once.</summary>
    public int Replicas => _replicas.Length;

    /// <summary>
    /// The gradient of <paramref name="node"/> written into <paramref name="destination"/> [Elements] (divided by the global
    /// batch, as each sample's loss is). <paramref name="indices"/> and <paramref name="keys"/> are the node's samples, in
    /// batch order; <paramref name="parameterVersion"/> tells when the primary network's parameters changed.
    /// </summary>
    public NodeGradient Compute(TreeNode node, Dataset data, ReadOnlySpan<long> indices, ReadOnlySpan<ulong> keys, long parameterVersion, Span<float> destination)
    {
        if (!Tree.Contains(node)) throw new ArgumentException($"{node} is not a node of the {Tree.Leaves}-leaf micro-batch tree");
        var (start, end) = Tree.Samples(node);
        if (indices.Length != end - start || keys.Length != end - start)
            throw new ArgumentException($"node {node} has {end - start} samples; {indices.Length} indices and {keys.Length} seeds were given");
        if (destination.Length != Elements) throw new ArgumentException($"gradient buffer of {destination.Length} elements, expected {Elements}");
        // Several threads run torch code at once here: no finalizer may free a temporary Scalar while a kernel reads it.
        using var gate = TorchRuntime.Compute();
        Sync(parameterVersion);
        var leaves = Enumerable.Range(node.First, node.Leaves).Select(i => new TreeNode(i, i + 1)).ToArray();
        var inputs = new (long[] Indices, ulong[] Keys)[leaves.Length];
        for (var k = 0; k < leaves.Length; k++)
        {
            var (a, b) = Tree.Samples(leaves[k]);
            inputs[k] = (indices[(a - start)..(b - start)].ToArray(), keys[(a - start)..(b - start)].ToArray());
        }
        if (leaves.Length == 1)
        {
            // A single micro-batch: its gradient is the node's, written straight into the destination.
            var (onlyPresent, onlyLoss) = LeafInto(0, data, inputs[0].Indices, inputs[0].Keys, destination);
            return new NodeGradient(onlyPresent, onlyLoss);
        }
        var results = new (float[] Values, byte[] Present, double Loss)[leaves.Length];
        TorchRuntime.UseIntraOpThreads(1);
        void Share(int r)
        {
            for (var k = r; k < leaves.Length; k += _replicas.Length)
                results[k] = Leaf(r, data, inputs[k].Indices, inputs[k].Keys);
        }
        if (_replicas.Length == 1)
            for (var k = 0; k < leaves.Length; k++) results[k] = Leaf(0, data, inputs[k].Indices, inputs[k].Keys);
        else
            Parallel.For(0, Math.Min(_replicas.Length, leaves.Length), new ParallelOptions { MaxDegreeOfParallelism = _replicas.Length }, Share);
        var present = new byte[results[0].Present.Length];
        var loss = 0.0;
        var byNode = new Dictionary<TreeNode, float[]>();
        for (var k = 0; k < leaves.Length; k++)
        {
            for (var b = 0; b < present.Length; b++) present[b] |= results[k].Present[b];
            loss += results[k].Loss;
            byNode[leaves[k]] = results[k].Values;
        }
        var total = MicroBatchTree.Combine(node, byNode, _buffers.Add);
        total.CopyTo(destination);
        _buffers.Add(total);
        return new NodeGradient(present, loss);
    }

    /// <summary>One micro-batch on replica <paramref name="r"/>: its gradient in a pooled buffer, presence, loss.</summary>
    private (float[] Values, byte[] Present, double Loss) Leaf(int r, Dataset data, long[] indices, ulong[] keys)
    {
        if (!_buffers.TryTake(out var values)) values = new float[Elements];
        var (present, loss) = LeafInto(r, data, indices, keys, values);
        return (values, present, loss);
    }

    /// <summary>One micro-batch on replica <paramref name="r"/>, its gradient written into <paramref name="values"/> [Elements].</summary>
    private (byte[] Present, double Loss) LeafInto(int r, Dataset data, long[] indices, ulong[] keys, Span<float> values)
    {
        TorchRuntime.UseIntraOpThreads(1);   // this thread's own count (a pool thread's is every core)
        var network = _replicas[r];
        network.zero_grad(set_to_none: true);   // presence then means "this micro-batch touched it"
        double loss;
        using (var scope = NewDisposeScope())
        {
            var x0 = data.Gather(indices).to(_device);
            var l = _step.Loss(network, x0, keys, Tree.BatchSize, network.Classes > 0 ? data.GatherLabels(indices) : null);
            l.backward();
            loss = l.to_type(ScalarType.Float64).item<double>();
        }
        var present = _vectors[r].ReadGradients(MemoryMarshal.AsBytes(values));
        network.zero_grad(set_to_none: true);
        return (present, loss);
    }

    /// <summary>Copies the primary network's parameters into the other replicas when they changed.</summary>
    private void Sync(long version)
    {
        if (_replicas.Length == 1 || version == _syncedVersion) return;
        _values ??= new float[Elements];
        _vectors[0].ReadValues(MemoryMarshal.AsBytes(_values.AsSpan()));
        for (var r = 1; r < _replicas.Length; r++) _vectors[r].WriteValues(_values);
        _syncedVersion = version;
    }

    public void Dispose()
    {
        for (var r = 1; r < _replicas.Length; r++) _replicas[r].Dispose();
    }
}
