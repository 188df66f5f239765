using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Metrics;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>
/// `coordinator classifier --data DIR`: trains (or checks) the data set's evaluation classifier, cached in DIR/classifier/,
/// and prints its held-out accuracy. `eval` uses the same cache and trains it on first use.
/// </summary>
internal static class ClassifierCommand
{
    public static Command Create()
    {
        var data = new Option<string>("--data") { Description = "Folder of an MNIST-style labelled data set (IDX files), e.g. data/mnist", Required = true };
        var dataset = new Option<string>("--dataset") { Description = "mnist or fashion-mnist", DefaultValueFactory = _ => "mnist" };
        var seed = new Option<long>("--split-seed") { Description = "Seed of the train / held-out split (the recipe's seed)", DefaultValueFactory = _ => new Recipe().Seed };
        var fraction = new Option<double>("--held-out-fraction") { Description = "Held-out share of the split (the recipe's held-out-fraction)", DefaultValueFactory = _ => new Recipe().HeldOutFraction };
        var retrain = new Option<bool>("--retrain") { Description = "Train again even if a valid cached classifier exists" };
        var json = new Option<bool>("--json") { Description = "Print the classifier's record (classifier.json) as JSON" };
        var threads = CliSupport.ThreadsOption();
        var cmd = new Command("classifier", "Train and cache the evaluation classifier of a labelled image data set (used by eval for confident-class shares and the classifier FID); prints its held-out accuracy")
        {
            data, dataset, seed, fraction, retrain, json, threads,
        };
        cmd.SetAction(p => Run(p.GetValue(data)!, p.GetValue(dataset)!, p.GetValue(seed), p.GetValue(fraction), p.GetValue(retrain), p.GetValue(json), p.GetValue(threads)));
        return cmd;
    }

    private static int Run(string folder, string datasetName, long splitSeed, double heldOutFraction, bool retrain, bool json, int threads)
    {
        var kind = datasetName.Trim().ToLowerInvariant() switch
        {
            "mnist" => DatasetKind.Mnist,
            "fashion-mnist" or "fashionmnist" => DatasetKind.FashionMnist,
            _ => throw new UsageException($"--dataset {datasetName}: expected mnist or fashion-mnist"),
        };
        if (!(heldOutFraction > 0 && heldOutFraction < 1))
            throw new UsageException($"--held-out-fraction {heldOutFraction.ToString(CultureInfo.InvariantCulture)}: expected a fraction in (0, 1)");
        if (!Directory.Exists(folder))
            throw new UsageException($"--data {folder}: folder does not exist; expected a folder of IDX files (coordinator download --dataset {datasetName} --out {folder})");
        CliSupport.ResolveDevice("cpu", threads);
        var recipe = new Recipe { Dataset = kind, DataPath = folder, Seed = splitSeed, HeldOutFraction = heldOutFraction };
        var (train, heldOut) = DatasetLoader.Load(recipe.ToDataOptions());
        using (train)
        using (heldOut)
        using (var classifier = Obtain(recipe, train, heldOut, retrain, announce: false))
        {
            if (json)
                Console.WriteLine(JsonSerializer.Serialize(classifier.Info, Recipe.JsonOptions));
            else
                Console.WriteLine(Describe(classifier));
        }
        return CliSupport.ExitOk;
    }

    /// <summary>The classifier config of the verb and of eval; tests swap in a tiny one (a few hundred images, one epoch).</summary>
    internal static ClassifierConfig Config { get; set; } = ClassifierConfig.Default;

    /// <summary>The recipe's data set classifier from the cache, or trained now with progress and outcome on stderr.</summary>
    internal static CachedClassifier Obtain(Recipe recipe, Dataset train, Dataset heldOut, bool retrain = false, bool announce = true, ClassifierConfig? config = null)
    {
        var classifier = ClassifierCache.LoadOrTrain(recipe.DataPath!, train, heldOut, recipe.HeldOutFraction, recipe.Seed, config ?? Config, retrain,
            message => Console.Error.WriteLine(message));
        if (classifier.Trained && announce)
            Console.Error.WriteLine(Describe(classifier));
        if (classifier.NotCached is { } problem)
            Console.Error.WriteLine($"warning: the classifier is not cached: {problem}");
        return classifier;
    }

    internal static string Describe(CachedClassifier classifier)
    {
        var i = classifier.Info;
        var origin = classifier.Trained
            ? string.Create(CultureInfo.InvariantCulture, $"trained in {i.TrainSeconds:F1} s")
            : string.Create(CultureInfo.InvariantCulture, $"cached; trained in {i.TrainSeconds:F1} s");
        return string.Create(CultureInfo.InvariantCulture,
            $"classifier: held-out accuracy {100 * i.HeldOutAccuracy:F2}% on {i.HeldOutImages} images ({i.Classes} classes; {i.TrainImages} training images, {i.Config.Epochs} epochs, {origin})");
    }
}
