using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Sampling;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Metrics;

/// <summary>Quality figures of a trained model; which ones apply depends on the data (2-D points or images).</summary>
public sealed record EvalReport
{
    public required string Recipe { get; init; }
    public required long Step { get; init; }
    /// <summary>Class-conditional image models: the samples' classes and guidance scale (e.g. "classes 0..9 in turn, guidance 2").</summary>
    public string? Conditioning { get; init; }
    /// <summary>2-D: sliced Wasserstein distance of the samples to held-out data, and its noise floor: the same distance for fresh draws of the data (averaged over several draws).</summary>
    public double? SlicedWasserstein { get; init; }
    public double? SlicedWassersteinFloor { get; init; }
    public int? SampleCount { get; init; }
    /// <summary>Images: variational bound on held-out images in bits/dim (Ho et al. eq. 5: L_T + sum L_{t-1} + L_0).</summary>
    public double? BitsPerDim { get; init; }
    public double? PriorBitsPerDim { get; init; }
    public int? BpdImages { get; init; }
    /// <summary>Images: mean distance of samples to their nearest training image, and of held-out images to theirs.</summary>
    public double? NearestTrainDistance { get; init; }
    public double? HeldOutNearestTrainDistance { get; init; }
    /// <summary>Labelled images: the data-set classifier's held-out accuracy, how it labels samples and held-out images, and the
    /// Fréchet distance in its penultimate feature space ("classifier FID") of samples and, as a floor, of training images to held-out images.</summary>
    public double? ClassifierAccuracy { get; init; }
    public ClassStats? SampleClasses { get; init; }
    public ClassStats? HeldOutClasses { get; init; }
    public double? ClassifierFid { get; init; }
    public double? ClassifierFidFloor { get; init; }
    public int? ClassifierFidFloorImages { get; init; }

    /// <summary>SWD / floor: 1.0 is as close to the data as a fresh draw of the data itself.</summary>
    public double? SlicedWassersteinRatio => SlicedWasserstein / SlicedWassersteinFloor;

    public IEnumerable<string> Lines()
    {
        var inv = System.Globalization.CultureInfo.InvariantCulture;
        yield return string.Create(inv, $"recipe {Recipe}, step {Step}{(Conditioning is null or "unconditional" ? "" : "; samples: " + Conditioning)}");
        if (SlicedWasserstein is { } swd)
            yield return string.Create(inv, $"sliced Wasserstein distance ({SampleCount} samples vs held-out data): {swd:F4}; noise floor {SlicedWassersteinFloor:F4}; ratio {SlicedWassersteinRatio:F2}");
        if (BitsPerDim is { } bpd)
            yield return string.Create(inv, $"bits/dim on {BpdImages} held-out images: {bpd:F3} (prior term {PriorBitsPerDim:F4})");
        if (NearestTrainDistance is { } nn)
            yield return string.Create(inv, $"nearest training image: samples {nn:F3}, held-out images {HeldOutNearestTrainDistance:F3} (much smaller for samples = memorization)");
        if (SampleClasses is { } sc && HeldOutClasses is { } hc)
        {
            static string Describe(ClassStats c) => string.Create(System.Globalization.CultureInfo.InvariantCulture,
                $"{100 * c.ConfidentShare:F1}% confident (>= {ClassifierFigures.Confidence}), {c.Classes} classes [{string.Join(" ", c.Histogram)}]");
            var accuracy = ClassifierAccuracy is { } a ? string.Create(inv, $" (held-out accuracy {100 * a:F2}%)") : "";
            yield return string.Create(inv, $"classifier{accuracy}: {sc.Images} samples: {Describe(sc)}; {hc.Images} held-out: {Describe(hc)}");
            yield return string.Create(inv, $"classifier FID: samples {ClassifierFid:F2} (vs {hc.Images} held-out images), train-vs-held-out floor {ClassifierFidFloor:F2} ({ClassifierFidFloorImages} training images)");
        }
    }
}

/// <summary>
/// Where an evaluation gets its samples and its bits/dim terms: computed here from a model (<see cref="LocalEvalSource"/>)
/// or by a coordinator's workers. Either way the same request gives the same samples and per-image terms.
/// </summary>
public interface IEvalSource
{
    /// <summary>Samples [n, ...] of <paramref name="request"/> (the caller disposes them).</summary>
    Tensor Sample(SamplingRequest request);

    /// <summary>Per-image bits/dim (total, prior) [m] of held-out images [0, m) with the noise of <paramref name="seed"/>.</summary>
    (Tensor Total, Tensor Prior) BitsPerDim(Dataset heldOut, int m, long seed);
}

/// <summary>The one-process evaluation: everything computed in this process from <paramref name="model"/>.</summary>
public sealed class LocalEvalSource(DiffusionModel model) : IEvalSource
{
    /// <summary>Held-out images per network batch of bits/dim (an image's terms depend on the batch size, not on the batch's other images).</summary>
    public int BpdBatch { get; init; } = Evaluator.DefaultBpdBatch;

    public Tensor Sample(SamplingRequest request)
    {
        using var result = model.Sample(request);
        return result.Samples.alias().DetachFromDisposeScope();
    }

    public (Tensor Total, Tensor Prior) BitsPerDim(Dataset heldOut, int m, long seed)
    {
        using var images = heldOut.Data.narrow(0, 0, m);
        return Evaluator.BitsPerDim(model, images, seed, BpdBatch);
    }
}

public static class Evaluator
{
    /// <summary>Independent data draws averaged for the sliced Wasserstein noise floor.</summary>
    public const int FloorDraws = 8;

    /// <summary>Held-out images per network batch of <see cref="BitsPerDim"/> unless told otherwise.</summary>
    public const int DefaultBpdBatch = 128;

    /// <summary>Variational bound per image in bits/dim [B]: the sum over t of the bound terms plus the prior term, with fixed per-image noise.</summary>
    /// <remarks>
    /// <paramref name="firstIndex"/>: the index of images[0] in the held-out split (image i's noise at t comes from
    /// (seed, firstIndex + i, t)), so a range computed elsewhere gives the terms of the whole split's computation.
    /// </remarks>
    public static (Tensor Total, Tensor Prior) BitsPerDim(DiffusionModel model, Tensor images, long seed = 0, int batchSize = DefaultBpdBatch, long firstIndex = 0, CancellationToken ct = default)
    {
        using var noGrad = no_grad();
        model.Network.eval();
        var d = model.Diffusion;
        var totals = new List<Tensor>();
        var priors = new List<Tensor>();
        for (long start = 0; start < images.shape[0]; start += batchSize)
        {
            using var scope = NewDisposeScope();
            var n = Math.Min(batchSize, images.shape[0] - start);
            var x0 = images.narrow(0, start, n).to(model.Device);
            var vb = zeros(n, device: model.Device);
            // A class-conditional model's bound is that of its unconditional model (the "no label" token): p(x), as for the others.
            var nullLabels = model.Network.Classes > 0 ? Enumerable.Repeat(model.Network.NullLabel, (int)n).ToArray() : null;
            for (var t = d.T - 1; t >= 0; t--)
            {
                ct.ThrowIfCancellationRequested();
                using var stepScope = NewDisposeScope();   // per-t intermediates go at once: memory stays flat in T
                var keys = Enumerable.Range(0, (int)n).Select(i => Randomness.BitsPerDimNoise(seed, firstIndex + start + i, t)).ToArray();
                var eps = CounterRng.NormalRows(keys, model.SampleShape, model.Device);
                var tt = full(new[] { n }, (long)t, ScalarType.Int64, model.Device);
                var xt = d.QSample(x0, tt, eps);
                vb.add_(d.VbTerms(ClassifierFreeGuidance.Output(model.Network, xt, tt, nullLabels, 1), x0, xt, tt, clipDenoised: model.Recipe.ClipDenoised));
            }
            var prior = d.PriorBpd(x0);
            totals.Add((vb + prior).cpu().DetachFromDisposeScope());
            priors.Add(prior.cpu().DetachFromDisposeScope());
        }
        return (cat(totals, 0), cat(priors, 0));
    }

    /// <summary>The figures that apply to the model's data.</summary>
    public static EvalReport Evaluate(DiffusionModel model, long step, Dataset train, Dataset heldOut, int samples = 2000, int bpdImages = 256, long seed = 1234,
        SamplingMethod sampler = SamplingMethod.Ddpm, int samplerSteps = 0, double eta = 0,
        DigitClassifier? classifier = null, double? classifierAccuracy = null, int classifierSamples = 1000, ClassGuidance? conditioning = null) =>
        Evaluate(new LocalEvalSource(model), model.Recipe, step, train, heldOut, samples, bpdImages, seed, sampler, samplerSteps, eta, classifier, classifierAccuracy, classifierSamples, conditioning);

    /// <summary>
    /// What an evaluation asks its source for: the samples drawn (the first 64 for the nearest-neighbour figure and, with a
    /// classifier, <paramref name="classifierSamples"/> for its figures: one sampling run serves both) and the held-out
    /// images of bits/dim (0 for 2-D data). A remote source fetches exactly these, at one weights snapshot, before
    /// <see cref="Evaluate(IEvalSource, Recipe, long, Dataset, Dataset, int, int, long, SamplingMethod, int, double, DigitClassifier?, double?, int, ClassGuidance?)"/> runs.
    /// </summary>
    public static (int Samples, int BpdImages) Plan(Recipe recipe, long heldOutCount, int samples = 2000, int bpdImages = 256, int classifierSamples = 0)
    {
        ArgumentNullException.ThrowIfNull(recipe);
        if (!recipe.IsImageData) return (samples, 0);
        var m = (int)Math.Min(bpdImages, heldOutCount);
        return (Math.Max(Math.Min(64, m), classifierSamples), m);
    }

    /// <summary>The figures that apply to the recipe's data, with samples and bits/dim terms from <paramref name="source"/>.</summary>
    public static EvalReport Evaluate(IEvalSource source, Recipe recipe, long step, Dataset train, Dataset heldOut, int samples = 2000, int bpdImages = 256, long seed = 1234,
        SamplingMethod sampler = SamplingMethod.Ddpm, int samplerSteps = 0, double eta = 0,
        DigitClassifier? classifier = null, double? classifierAccuracy = null, int classifierSamples = 1000, ClassGuidance? conditioning = null)
    {
        conditioning ??= ClassGuidance.Default;
        var withClassifier = classifier is not null && classifierSamples > 0;
        if (withClassifier && classifierSamples < 2)
            throw new ArgumentException($"classifier samples = {classifierSamples}: expected 0 (skip the classifier figures) or at least 2");
        var plan = Plan(recipe, heldOut.Count, samples, bpdImages, withClassifier ? classifierSamples : 0);
        if (!recipe.IsImageData)
        {
            // n samples and n-point fresh draws of the data are each compared with the whole held-out set;
            // the floor averages several fresh draws, so both figures carry the same finite-sample noise.
            var n = plan.Samples;
            using var drawn = source.Sample(new SamplingRequest(n, sampler, samplerSteps, eta, seed, Conditioning: conditioning));
            var swd = SlicedWasserstein.Distance(drawn, heldOut.Data);
            var floors = new List<double>();
            for (var k = 0; k < FloorDraws; k++)
            {
                using var draw = Synthetic2D.Generate(recipe.Dataset, n, Randomness.FloorDraw(recipe.Seed, seed, k));
                floors.Add(SlicedWasserstein.Distance(draw, heldOut.Data));
            }
            return new EvalReport
            {
                Recipe = recipe.Name,
                Step = step,
                SampleCount = n,
                SlicedWasserstein = swd,
                SlicedWassersteinFloor = floors.Average(),
            };
        }
        var m = plan.BpdImages;
        var (total, prior) = source.BitsPerDim(heldOut, m, seed);
        using (total)
        using (prior)
        {
            var k = Math.Min(64, m);
            // One sampling run serves both: the first k samples for the nearest-neighbour figure, all for the classifier's.
            using var sampled = source.Sample(new SamplingRequest(plan.Samples, sampler, samplerSteps, eta, seed, Conditioning: conditioning));
            var figures = withClassifier ? ClassifierFigures.Compute(classifier!, sampled.narrow(0, 0, classifierSamples), train, heldOut) : null;
            using var nnSamples = sampled.narrow(0, 0, k);
            using var sampleNn = NearestNeighbour.Distances(nnSamples, train.Data);
            using var heldNn = NearestNeighbour.Distances(heldOut.Data.narrow(0, 0, k), train.Data);
            return new EvalReport
            {
                Recipe = recipe.Name,
                Step = step,
                Conditioning = conditioning.Describe(recipe.Classes, recipe.Guidance),
                BitsPerDim = total.mean().item<float>(),
                PriorBitsPerDim = prior.mean().item<float>(),
                BpdImages = m,
                NearestTrainDistance = sampleNn.mean().item<float>(),
                HeldOutNearestTrainDistance = heldNn.mean().item<float>(),
                SampleCount = k,
                ClassifierAccuracy = figures is null ? null : classifierAccuracy,
                SampleClasses = figures?.Samples,
                HeldOutClasses = figures?.HeldOut,
                ClassifierFid = figures?.Fid,
                ClassifierFidFloor = figures?.FidFloor,
                ClassifierFidFloorImages = figures?.FloorImages,
            };
        }
    }
}
