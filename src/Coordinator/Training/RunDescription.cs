using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Training;
using DistDiffusion.Protocol.V1;

namespace DistDiffusion.Coordinator.Training;

/// <summary>
/// The run as a joining worker is told it (the Welcome): an id new at every coordinator start, the recipe and its JSON,
/// the gradients' wire dtype, the parameter layout and the training set's size. Fixed for the loop's life.
/// </summary>
public sealed class RunDescription(string runId, Recipe recipe, DType gradientDtype, ParameterVector vector, long trainSize)
{
    public string RunId { get; } = runId;
    public Recipe Recipe { get; } = recipe;
    public string RecipeJson { get; } = recipe.ToJson();
    public DType GradientDtype { get; } = gradientDtype;
    public long ParameterElements { get; } = vector.Elements;
    public int ParameterCount { get; } = vector.Count;
    public long TrainSize { get; } = trainSize;
    public IReadOnlyList<ParameterInfo> ParameterInfos { get; } = [.. vector.Shapes.Select(s => new ParameterInfo { Name = s.Name, Shape = { s.Shape } })];
}
