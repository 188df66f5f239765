namespace DistDiffusion.Model.Data;

/// <summary>Builds the training and held-out datasets a recipe's data fields (<see cref="DataOptions"/>) ask for.</summary>
public static class DatasetLoader
{
    /// <summary>Seed stream of the synthetic training points: <c>Randomness.SyntheticSet(options.Seed, TrainStream)</c>.</summary>
    public const long TrainStream = (long)Randomness.SyntheticTrainTag;

    /// <summary>Seed stream of the independent synthetic held-out points.</summary>
    public const long HeldOutStream = (long)Randomness.SyntheticHeldOutTag;

    /// <summary>
    /// Synthetic kinds: <c>options.SyntheticSize</c> training points drawn with seed Mix(options.Seed, 0) and an
    /// independent held-out set of the same size drawn with Mix(options.Seed, 1). Image kinds: the whole of
    /// <c>options.DataPath</c> (MNIST / Fashion-MNIST IDX files, or an image folder resized to
    /// <c>options.ImageSize</c>, RGB) split with <c>Split(options.HeldOutFraction, options.Seed)</c>.
    /// </summary>
    public static (Dataset Train, Dataset HeldOut) Load(DataOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        var kind = options.Dataset;
        if (Synthetic2D.IsSynthetic(kind))
        {
            var n = options.SyntheticSize;
            if (n < 1) throw new ArgumentException($"recipe field 'synthetic-size' = {n}: expected an integer >= 1");
            var trainSeed = Randomness.SyntheticSet(options.Seed, Randomness.SyntheticTrainTag);
            var heldSeed = Randomness.SyntheticSet(options.Seed, Randomness.SyntheticHeldOutTag);
            var name = Naming.Kebab(kind.ToString());
            var train = new Dataset(Synthetic2D.Generate(kind, n, trainSeed), $"{name}: {n} training points (seed {options.Seed}, stream {TrainStream})");
            var held = new Dataset(Synthetic2D.Generate(kind, n, heldSeed), $"{name}: {n} held-out points (seed {options.Seed}, stream {HeldOutStream})");
            return (train, held);
        }

        if (string.IsNullOrWhiteSpace(options.DataPath))
            throw new ArgumentException($"recipe field 'data-path' is unset: dataset {Naming.Kebab(kind.ToString())} needs a folder holding the dataset files");
        using var all = kind switch
        {
            DatasetKind.Mnist or DatasetKind.FashionMnist => MnistFiles.Load(options.DataPath, kind),
            DatasetKind.ImageFolder => ImageFolderReader.Load(options.DataPath, options.ImageSize, 3),
            _ => throw new ArgumentException($"unsupported dataset kind {kind}"),
        };
        return all.Split(options.HeldOutFraction, options.Seed);
    }
}
