namespace DistDiffusion.Model.Data;

/// <summary>
/// What <see cref="DatasetLoader.Load"/> reads: the recipe's data fields (built by <c>Recipe.ToDataOptions()</c>, so Data
/// does not depend on Training). Messages name the recipe fields (<c>data-path</c>, <c>synthetic-size</c>).
/// </summary>
/// <param name="Dataset">Recipe field <c>dataset</c>.</param>
/// <param name="DataPath">Recipe field <c>data-path</c>: the folder of an image dataset; unused for 2-D data.</param>
/// <param name="SyntheticSize">Recipe field <c>synthetic-size</c>: points per synthetic set (training and held-out each).</param>
/// <param name="HeldOutFraction">Recipe field <c>held-out-fraction</c>: the share of an image dataset held out.</param>
/// <param name="ImageSize">Recipe field <c>image-size</c>: the side an image folder is resized to.</param>
/// <param name="Seed">Recipe field <c>seed</c>: seeds the synthetic sets and the held-out split.</param>
public sealed record DataOptions(DatasetKind Dataset, string? DataPath, int SyntheticSize, double HeldOutFraction, int ImageSize, long Seed);
