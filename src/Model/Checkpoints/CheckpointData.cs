using DistDiffusion.Model.Configuration;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Checkpoints;

/// <summary>
/// Everything needed to resume a run: the recipe, the position in training, and the tensors.
/// The tensors are owned by whoever holds the record (<see cref="CheckpointStore.Load"/> hands over fresh CPU tensors).
/// </summary>
/// <param name="Recipe">The recipe the run was started with.</param>
/// <param name="Step">Optimizer steps taken.</param>
/// <param name="Epoch">Passes over the training data completed.</param>
/// <param name="Cursor">Position inside the current epoch.</param>
/// <param name="Seed">The run's seed.</param>
/// <param name="Model">Weights by parameter name.</param>
/// <param name="Ema">EMA weights by parameter name (empty when EMA is off).</param>
/// <param name="Optimizer">Optimizer state tensors (e.g. "exp_avg.&lt;name&gt;", "exp_avg_sq.&lt;name&gt;").</param>
/// <param name="Extra">Small extra facts (e.g. "optimizer.step"), stored in checkpoint.json.</param>
public sealed record CheckpointData(
    Recipe Recipe, long Step, long Epoch, long Cursor, long Seed,
    IReadOnlyDictionary<string, Tensor> Model,
    IReadOnlyDictionary<string, Tensor> Ema,
    IReadOnlyDictionary<string, Tensor> Optimizer,
    IReadOnlyDictionary<string, string> Extra);
