using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Data;

/// <summary>Loads MNIST or Fashion-MNIST from a folder of IDX files (the names of the official release).</summary>
public static class MnistFiles
{
    /// <summary>Split prefixes in load order.</summary>
    public static IReadOnlyList<string> Splits { get; } = ["train", "t10k"];

    public static string ImagesFileName(string split) => $"{split}-images-idx3-ubyte";

    public static string LabelsFileName(string split) => $"{split}-labels-idx1-ubyte";

    /// <summary>
    /// Loads every split present in <paramref name="folder"/> (train first, then t10k; each file raw or
    /// .gz) into one dataset with labels. Images and labels of a split must both be there and agree in count.
    /// </summary>
    public static Dataset Load(string folder, DatasetKind kind)
    {
        ArgumentException.ThrowIfNullOrEmpty(folder);
        var name = kind switch
        {
            DatasetKind.Mnist => "MNIST",
            DatasetKind.FashionMnist => "Fashion-MNIST",
            _ => throw new ArgumentException($"MnistFiles loads MNIST or Fashion-MNIST, not {kind}", nameof(kind)),
        };
        var expected = string.Join(", ", Splits.SelectMany(s => new[] { ImagesFileName(s), LabelsFileName(s) }).Select(f => $"{f}[.gz]"));
        if (!Directory.Exists(folder))
            throw new DirectoryNotFoundException($"{name} folder {folder} does not exist; expected it to hold {expected} (download them with DatasetDownloader)");

        var images = new List<Tensor>();
        var labels = new List<Tensor>();
        var parts = new List<string>();
        try
        {
            foreach (var split in Splits)
            {
                var imagesPath = Find(folder, ImagesFileName(split));
                var labelsPath = Find(folder, LabelsFileName(split));
                if (imagesPath is null && labelsPath is null) continue;
                if (imagesPath is null || labelsPath is null)
                {
                    var missing = imagesPath is null ? ImagesFileName(split) : LabelsFileName(split);
                    var present = imagesPath ?? labelsPath;
                    throw new FileNotFoundException($"{name} folder {folder}: found {Path.GetFileName(present)} but not {missing}[.gz]", Path.Combine(folder, missing));
                }
                var x = IdxReader.ReadImages(imagesPath);
                images.Add(x);
                var y = IdxReader.ReadLabels(labelsPath);
                labels.Add(y);
                if (x.shape[0] != y.shape[0])
                    throw new InvalidDataException($"{name} split '{split}' in {folder}: {Path.GetFileName(imagesPath)} holds {x.shape[0]} images but {Path.GetFileName(labelsPath)} holds {y.shape[0]} labels");
                if (images.Count > 1 && !x.shape.AsSpan(1).SequenceEqual(images[0].shape.AsSpan(1)))
                    throw new InvalidDataException($"{name} split '{split}' in {folder}: images are [{string.Join(", ", x.shape[1..])}], other splits [{string.Join(", ", images[0].shape[1..])}]");
                parts.Add($"{split} {x.shape[0]}");
            }
            if (images.Count == 0)
                throw new FileNotFoundException($"{name} folder {folder} holds no IDX files; expected {expected} (download them with DatasetDownloader)", folder);

            var data = images.Count == 1 ? images[0].alias() : torch.cat(images, 0);
            var allLabels = labels.Count == 1 ? labels[0].alias() : torch.cat(labels, 0);
            var shape = images[0].shape;
            return new Dataset(data, $"{name} ({string.Join(" + ", parts)} images, {shape[2]}x{shape[3]}) from {folder}", allLabels);
        }
        finally
        {
            foreach (var t in images) t.Dispose();
            foreach (var t in labels) t.Dispose();
        }
    }

    private static string? Find(string folder, string fileName)
    {
        foreach (var candidate in new[] { fileName, fileName + ".gz" })
        {
            var p = Path.Combine(folder, candidate);
            if (File.Exists(p)) return p;
        }
        return null;
    }
}
