using DistDiffusion.Model.Training;

namespace DistDiffusion.Model.Data;

/// <summary>Builds the training and held-out datasets a recipe asks for.</summary>
public static class DatasetLoader
{
    /// <summary>Seed stream of the synthetic training points: <c>Randomness.SyntheticSet(recipe.Seed, TrainStream)</c>.</summary>
    public const long TrainStream = (long)Randomness.SyntheticTrainTag;

    /// <summary>Seed stream of the independent synthetic held-out points.</summary>
    public const long HeldOutStream = (long)Randomness.SyntheticHeldOutTag;

    /// <summary>
    /// Synthetic kinds: <c>recipe.SyntheticSize</c> training points drawn with seed Mix(recipe.Seed, 0) and an
    /// independent held-out set of the same size drawn with Mix(recipe.Seed, 1). Image kinds: the whole of
    /// <c>recipe.DataPath</c> (MNIST / Fashion-MNIST IDX files, or an image folder resized to
    /// <c>recipe.ImageSize</c>, RGB) split with <c>Split(recipe.HeldOutFraction, recipe.Seed)</c>.
    /// </summary>
    public static (Dataset Train, Dataset HeldOut) Load(Recipe recipe)
    {
        ArgumentNullException.ThrowIfNull(recipe);
        var kind = recipe.Dataset;
        if (Synthetic2D.IsSynthetic(kind))
        {
            var n = recipe.SyntheticSize;
            if (n < 1) throw new ArgumentException($"recipe field 'synthetic-size' = {n}: expected an integer >= 1");
            var trainSeed = Randomness.SyntheticSet(recipe.Seed, Randomness.SyntheticTrainTag);
            var heldSeed = Randomness.SyntheticSet(recipe.Seed, Randomness.SyntheticHeldOutTag);
            var name = Recipe.Kebab(kind.ToString());
            var train = new Dataset(Synthetic2D.Generate(kind, n, trainSeed), $"{name}: {n} training points (seed {recipe.Seed}, stream {TrainStream})");
            var held = new Dataset(Synthetic2D.Generate(kind, n, heldSeed), $"{name}: {n} held-out points (seed {recipe.Seed}, stream {HeldOutStream})");
            return (train, held);
        }

        if (string.IsNullOrWhiteSpace(recipe.DataPath))
            throw new ArgumentException($"recipe field 'data-path' is unset: dataset {Recipe.Kebab(kind.ToString())} needs a folder holding the dataset files");
        using var all = kind switch
        {
            DatasetKind.Mnist or DatasetKind.FashionMnist => MnistFiles.Load(recipe.DataPath, kind),
            DatasetKind.ImageFolder => ImageFolderReader.Load(recipe.DataPath, recipe.ImageSize, 3),
            _ => throw new ArgumentException($"unsupported dataset kind {kind}"),
        };
        return all.Split(recipe.HeldOutFraction, recipe.Seed);
    }

    /// <summary>
    /// A recipe's relative data path resolved against the working directory, then against the folders above
    /// the executable (so `data/mnist` is found from any folder of a source checkout).
    /// </summary>
    public static Recipe ResolveDataPath(Recipe recipe)
    {
        if (!recipe.IsImageData || string.IsNullOrWhiteSpace(recipe.DataPath) || Path.IsPathRooted(recipe.DataPath))
            return recipe;
        var candidates = new List<string> { Path.GetFullPath(recipe.DataPath) };
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            candidates.Add(Path.Combine(dir.FullName, recipe.DataPath));
        var found = candidates.FirstOrDefault(Directory.Exists);
        return found is null ? recipe : recipe with { DataPath = found };
    }
}
