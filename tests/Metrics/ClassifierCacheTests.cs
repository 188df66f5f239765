using System.IO.Compression;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Metrics;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Metrics;

/// <summary>The evaluation classifier's cache, on a copy of the committed MNIST files and a tiny config (500 images, two epochs).</summary>
public sealed class ClassifierCacheTests() : TempFolderTest("dd-classifier")
{
    private static readonly ClassifierConfig Tiny = new() { Epochs = 2, TrainLimit = 500, BatchSize = 25, Conv1Channels = 4, Conv2Channels = 8, Features = 16 };

    private string CopyData()
    {
        var folder = Path.Combine(Dir, "mnist");
        Directory.CreateDirectory(folder);
        foreach (var f in Directory.GetFiles(Data.TestFiles.MnistFolder, "*-ubyte.gz"))
            File.Copy(f, Path.Combine(folder, Path.GetFileName(f)));
        return folder;
    }

    [Fact]
    public void CachedClassifierIsReusedAndCorruptOrStaleCachesAreRetrained()
    {
        var data = CopyData();
        using var all = MnistFiles.Load(data, DatasetKind.Mnist);
        var (train, heldOut) = all.Split(0.1, 0);
        using (train)
        using (heldOut)
        {
            CachedClassifier Get(ClassifierConfig? config = null, double fraction = 0.1) =>
                ClassifierCache.LoadOrTrain(data, train, heldOut, fraction, 0, config ?? Tiny);

            string firstSha;
            float[] firstProbabilities;
            using (var first = Get())
            {
                Assert.True(first.Trained);
                Assert.Contains("no cached classifier", first.WhyTrained);
                Assert.Null(first.NotCached);
                Assert.InRange(first.Info.HeldOutAccuracy, 0.4, 1.0);        // 500 images, two epochs: far better than chance (0.1)
                Assert.Equal(10, first.Info.Classes);
                firstSha = first.Info.WeightsSha256;
                firstProbabilities = Probabilities(first, heldOut);
            }
            var folder = ClassifierCache.Folder(data);
            Assert.True(File.Exists(Path.Combine(folder, ClassifierCache.WeightsFileName)));
            Assert.True(File.Exists(Path.Combine(folder, ClassifierCache.InfoFileName)));

            using (var again = Get())
            {
                Assert.False(again.Trained);
                Assert.Equal(firstSha, again.Info.WeightsSha256);
                Assert.Equal(firstProbabilities, Probabilities(again, heldOut));
            }

            // A flipped byte in the weights: detected by the checksum, retrained (deterministically: the same weights).
            var weights = Path.Combine(folder, ClassifierCache.WeightsFileName);
            var bytes = File.ReadAllBytes(weights);
            bytes[^3] ^= 0x40;
            File.WriteAllBytes(weights, bytes);
            using (var afterFlip = Get())
            {
                Assert.True(afterFlip.Trained);
                Assert.Contains("corrupt cache", afterFlip.WhyTrained);
                Assert.Contains("checksum", afterFlip.WhyTrained);
                Assert.Equal(firstSha, afterFlip.Info.WeightsSha256);
            }

            // A truncated JSON record.
            var info = Path.Combine(folder, ClassifierCache.InfoFileName);
            File.WriteAllText(info, File.ReadAllText(info)[..40]);
            using (var afterTruncation = Get())
            {
                Assert.True(afterTruncation.Trained);
                Assert.Contains("corrupt cache", afterTruncation.WhyTrained);
            }

            // Weights missing altogether.
            File.Delete(weights);
            using (var afterDelete = Get())
                Assert.Contains("is missing", afterDelete.WhyTrained);

            // Another config, another split: stale.
            using (var otherConfig = Get(Tiny with { Epochs = 3 }))
            {
                Assert.True(otherConfig.Trained);
                Assert.Contains("stale cache: trained with", otherConfig.WhyTrained);
            }
            using (var otherSplit = Get(Tiny with { Epochs = 3 }, fraction: 0.2))
                Assert.Contains("stale cache: trained on the split", otherSplit.WhyTrained);
            using (var cachedAgain = Get(Tiny with { Epochs = 3 }, fraction: 0.2))
                Assert.False(cachedAgain.Trained);

            // The data files change (the labels now raw instead of gzip): stale.
            var labels = Path.Combine(data, "t10k-labels-idx1-ubyte.gz");
            using (var gz = new GZipStream(File.OpenRead(labels), CompressionMode.Decompress))
            using (var raw = File.Create(Path.Combine(data, "t10k-labels-idx1-ubyte")))
                gz.CopyTo(raw);
            File.Delete(labels);
            using (var afterDataChange = Get(Tiny with { Epochs = 3 }, fraction: 0.2))
            {
                Assert.True(afterDataChange.Trained);
                Assert.Contains("data files changed", afterDataChange.WhyTrained);
            }
        }
    }

    private static float[] Probabilities(CachedClassifier c, Dataset heldOut)
    {
        using var images = heldOut.Data.narrow(0, 0, 50);
        var (features, probabilities) = c.Network.Predict(images);
        using (features)
        using (probabilities)
            return probabilities.data<float>().ToArray();
    }

    [Fact]
    public void ClassStatsCountConfidentImagesAndClasses()
    {
        using var p = tensor(new float[,] { { 0.95f, 0.05f, 0 }, { 0.5f, 0.4f, 0.1f }, { 0, 0.08f, 0.92f }, { 0.91f, 0.09f, 0 } });
        var stats = ClassifierFigures.Stats(p);
        Assert.Equal(4, stats.Images);
        Assert.Equal(0.75, stats.ConfidentShare, 12);
        Assert.Equal(2, stats.Classes);
        Assert.Equal(new[] { 3, 0, 1 }, stats.Histogram);
    }
}
