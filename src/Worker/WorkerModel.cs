using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Networks;
using DistDiffusion.Model.Training;
using DistDiffusion.Protocol;
using static TorchSharp.torch;

namespace DistDiffusion.Worker;

/// <summary>
/// What a worker computes with for one run: its copy of the recipe's network, the training split (loaded
/// locally on the first training or bits/dim assignment: a worker that only samples needs no data), the held-out
/// split of evaluation work (loaded with it), and the loss of
/// Algorithm 1. Kept across reconnects while the recipe stays the same.
/// </summary>
internal sealed class WorkerModel : IDisposable
{
    private Dataset? _train;
    private Dataset? _heldOut;

    private readonly RecipeModel _parts;

    private WorkerModel(string recipeJson, Recipe recipe, RecipeModel parts, Device device)
    {
        RecipeJson = recipeJson;
        Recipe = recipe;
        _parts = parts;
        Device = device;
        Vector = ParameterVector.Of(parts.Network);
    }

    public string RecipeJson { get; }
    public Recipe Recipe { get; }
    public DenoiserNetwork Network => _parts.Network;
    public TrainingStep TrainingStep => _parts.TrainingStep;
    public Device Device { get; }
    public ParameterVector Vector { get; }
    /// <summary>Version of the parameters now in <see cref="Network"/> (null: none received yet).</summary>
    public ulong? ParameterVersion { get; set; }

    public static WorkerModel Load(string recipeJson, Device device)
    {
        var recipe = Recipe.FromJson(recipeJson);
        return new WorkerModel(recipeJson, recipe, ModelFactory.Create(recipe, device, training: true), device);
    }

    /// <summary>The training split, loaded on first use; it must have the coordinator's <paramref name="expectedSize"/>.</summary>
    public Dataset Train(long expectedSize)
    {
        LoadSplits();
        if (_train!.Count != expectedSize)
            throw new ProtocolException(Grpc.Core.StatusCode.FailedPrecondition,
                $"this worker's training split has {_train.Count} samples but the coordinator's has {expectedSize}: the dataset at '{Recipe.DataPath}' differs");
        return _train;
    }

    /// <summary>The held-out split (loaded with the training split on first use); it must have the client's <paramref name="expectedSize"/>.</summary>
    public Dataset HeldOut(ulong expectedSize)
    {
        LoadSplits();
        if ((ulong)_heldOut!.Count != expectedSize)
            throw new InvalidOperationException(
                $"this worker's held-out split has {_heldOut.Count} images but the evaluating client's has {expectedSize}: the dataset at '{Recipe.DataPath}' differs");
        return _heldOut;
    }

    private readonly object _loading = new();

    /// <summary>Loads both splits once (training on the session's thread and evaluation on the sampler's may ask at once).</summary>
    private void LoadSplits()
    {
        lock (_loading)
        {
            if (_train is not null) return;
            var (train, heldOut) = DatasetLoader.Load(Recipe.WithResolvedDataPath().ToDataOptions());
            (_train, _heldOut) = (train, heldOut);
        }
    }

    /// <summary>Computes micro-batch gradients the way `coordinator train` does (created on the first assignment).</summary>
    private MicroBatchGradients? _gradients;

    /// <summary>
    /// The gradient of one slice, the micro-batch tree node <paramref name="node"/>: L_simple of the samples at
    /// <paramref name="indices"/> with their seeds, divided by the global batch size, micro-batch by micro-batch, added in
    /// the tree's order (<see cref="MicroBatchGradients"/>), written into <paramref name="values"/> [Elements * 4 bytes]
    /// (a pooled or shared buffer). Returns the presence bitmap and the slice's loss.
    /// </summary>
    public (byte[] Present, double Loss) Gradient(Dataset train, TreeNode node, ReadOnlySpan<long> indices, ReadOnlySpan<ulong> seeds, Span<byte> values)
    {
        using var guard = Model.TorchRuntime.Compute();   // other threads allocate: temporaries must outlive their native calls
        _gradients ??= new MicroBatchGradients(Recipe, Network, TrainingStep, Device, Model.TorchRuntime.ConfiguredThreads);
        if (!_gradients.Tree.Contains(node))
            throw new ProtocolException(Grpc.Core.StatusCode.InvalidArgument, $"micro-batches {node} are not a node of this recipe's {_gradients.Tree.Leaves}-leaf tree");
        var g = _gradients.Compute(node, train, indices, seeds, (long)(ParameterVersion ?? 0), System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(values));
        return (g.Present, g.Loss);
    }

    public void Dispose()
    {
        _gradients?.Dispose();
        _parts.Dispose();
        _train?.Dispose();
        _heldOut?.Dispose();
    }
}
