using DistDiffusion.Model.Data;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Metrics;

/// <summary>How the evaluation classifier labels a set of images.</summary>
/// <param name="Images">images labelled.</param>
/// <param name="ConfidentShare">share whose largest softmax probability is at least <see cref="ClassifierFigures.Confidence"/>.</param>
/// <param name="Classes">classes that are the most probable class of at least one image.</param>
/// <param name="Histogram">images per most probable class, indexed by class.</param>
public sealed record ClassStats(int Images, double ConfidentShare, int Classes, int[] Histogram);

/// <summary>The data-set classifier's figures of an evaluation: class statistics of samples and real images, and the classifier FID.</summary>
public sealed record ClassifierFigureSet(ClassStats Samples, ClassStats HeldOut, double Fid, double FidFloor, int FloorImages);

public static class ClassifierFigures
{
    /// <summary>The softmax maximum from which an image counts as confidently classified.</summary>
    public const double Confidence = 0.9;

    public static ClassStats Stats(Tensor probabilities)
    {
        ArgumentNullException.ThrowIfNull(probabilities);
        if (probabilities.dim() != 2 || probabilities.shape[0] < 1)
            throw new ArgumentException($"probabilities must be [N >= 1, classes], got [{string.Join(", ", probabilities.shape)}]", nameof(probabilities));
        using var scope = NewDisposeScope();
        var (top, cls) = probabilities.max(1);
        var confident = top.ge(Confidence).to(ScalarType.Float64).mean().item<double>();
        var histogram = new int[probabilities.shape[1]];
        foreach (var c in cls.data<long>()) histogram[c]++;
        return new ClassStats((int)probabilities.shape[0], confident, histogram.Count(h => h > 0), histogram);
    }

    /// <summary>
    /// <paramref name="samples"/> [N, C, H, W] against the first min(N, held-out count) held-out images: class statistics of both, the
    /// Fréchet distance of their penultimate features, and its floor, the same distance of the first min(N, train count) training
    /// images to those held-out images (real against real; the classifier has seen these training images, so the floor is a little high).
    /// </summary>
    public static ClassifierFigureSet Compute(DigitClassifier classifier, Tensor samples, Dataset train, Dataset heldOut)
    {
        ArgumentNullException.ThrowIfNull(classifier);
        ArgumentNullException.ThrowIfNull(samples);
        ArgumentNullException.ThrowIfNull(train);
        ArgumentNullException.ThrowIfNull(heldOut);
        var n = samples.shape[0];
        if (n < 2) throw new ArgumentException($"classifier figures need at least 2 samples, got {n}", nameof(samples));
        var m = Math.Min(n, heldOut.Count);
        var f = Math.Min(n, train.Count);
        if (m < 2 || f < 2)
            throw new ArgumentException($"classifier figures need at least 2 held-out and 2 training images, got {heldOut.Count} and {train.Count}");
        using var scope = NewDisposeScope();
        var (sampleFeatures, sampleProbabilities) = classifier.Predict(samples.cpu());
        var (heldFeatures, heldProbabilities) = classifier.Predict(heldOut.Data.narrow(0, 0, m));
        var (trainFeatures, trainProbabilities) = classifier.Predict(train.Data.narrow(0, 0, f));
        return new ClassifierFigureSet(
            Stats(sampleProbabilities),
            Stats(heldProbabilities),
            FrechetDistance.Distance(sampleFeatures, heldFeatures),
            FrechetDistance.Distance(trainFeatures, heldFeatures),
            (int)f);
    }
}
