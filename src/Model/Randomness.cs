namespace DistDiffusion.Model;

/// <summary>What consumes a derived 64-bit value: streams of different consumers never meet, whatever their values.</summary>
public enum RandomConsumer
{
    /// <summary>A <see cref="Diffusion.CounterRng"/> key: value number p is a pure function of (key, p).</summary>
    CounterRng,
    /// <summary>The state of a SplitMix64 sequence (<c>Data.DeterministicRandom</c>).</summary>
    SplitMixState,
    /// <summary>A torch generator's seed (<c>manual_seed</c>).</summary>
    TorchGenerator,
    /// <summary>The seed of a <see cref="System.Random"/> (truncated to 32 bits).</summary>
    SystemRandom,
}

/// <summary>
/// One part of a stream's derivation <c>Mix(Mix(Mix(root, c1), c2), ...)</c>: a fixed tag, or a variable in [Min, Max].
/// </summary>
public sealed record KeyPart(string Name, ulong Min, ulong Max)
{
    public static KeyPart Tag(ulong value) => new($"0x{value:X}", value, value);
    public static KeyPart Var(string name, ulong max = ulong.MaxValue, ulong min = 0) => new(name, min, max);
    public bool IsTag => Min == Max;
    public bool Overlaps(KeyPart other) => Min <= other.Max && other.Min <= Max;
    public override string ToString() => IsTag ? Name : Max == ulong.MaxValue ? Name : $"{Name} in [{Min}, {Max}]";
}

/// <summary>A random stream: its name, consumer, the seed it starts from, its derivation and who uses it.</summary>
/// <param name="Root">the seed at the root: the run's seed, a sampling request's seed, ...; any 64-bit value.</param>
/// <param name="Parts">the values mixed in after the root, in order (<see cref="SeedMix.Mix(ulong, ulong)"/> each).</param>
public sealed record RandomStream(string Name, RandomConsumer Consumer, string Root, IReadOnlyList<KeyPart> Parts, string UsedBy)
{
    public override string ToString() =>
        $"{Name}: {Consumer} {Parts.Aggregate(Root, (inner, p) => $"Mix({inner}, {p})")} ({UsedBy})";
}

/// <summary>
/// Every random stream of the program and its derivation, in one place. Each stream is a function of its root seed and
/// the parts listed; the call sites use the methods below, never SeedMix with their own tag. Two streams of the same
/// consumer with as many parts are kept apart by a part where one has a tag the other cannot take (a different tag,
/// or a tag outside the other's variable range) — <see cref="Overlaps"/> lists the pairs where that does not hold for
/// every input and why they do not meet. Streams of different depth go through different SeedMix nests.
/// Changing a tag or a derivation changes the bits of every run: the tests pin them.
/// </summary>
public static class Randomness
{
    /// <summary>
    /// Held while torch's process-wide generator is seeded and modules draw their initial weights from it (every module
    /// constructor draws, even when its weights are overwritten later). Without it, a module built on another thread
    /// between <c>manual_seed</c> and the last draw of a seeded network changes that network's initial weights.
    /// Re-entrant (a monitor).
    /// </summary>
    public static readonly object GlobalGeneratorLock = new();

    // ---- tags ----
    /// <summary>Sampling chain i of a request: its x_T and every step's noise.</summary>
    public const ulong SamplingTag = 0x5A3D1E;
    /// <summary>The data order's permutation of an epoch.</summary>
    public const ulong DataOrderTag = 0x0E90C4;
    /// <summary>Evaluation's fresh draws of the 2-D data (the sliced-Wasserstein floor): draw k uses FloorTag + k.</summary>
    public const ulong FloorTag = 0xF100;
    /// <summary>Sliced-Wasserstein projection directions.</summary>
    public const ulong SlicedWassersteinTag = 0x5D;
    /// <summary>The coordinator's --verify-fraction draw of the slices computed twice (TrainingLoop).</summary>
    public const ulong VerifyTag = 0x5EF1;
    /// <summary>The train / held-out split of an image dataset.</summary>
    public const ulong SplitTag = 0x5B117;
    /// <summary>The evaluation classifier (Metrics.DigitClassifier): its weights and its epochs' batch order.</summary>
    public const ulong ClassifierTag = 0xC1A55;
    /// <summary>The synthetic 2-D training points and the independent held-out points.</summary>
    public const ulong SyntheticTrainTag = 0, SyntheticHeldOutTag = 1;
    /// <summary>A training sample's epsilon: its own stream, the sample key mixed with this.</summary>
    public const ulong TrainingNoiseTag = 3;

    // ---- positions of a training sample's key stream (CounterRng) ----
    /// <summary>t ~ Uniform({0..T-1}).</summary>
    public const ulong TimestepPosition = 0;
    /// <summary>The horizontal flip (uniform &lt; 0.5).</summary>
    public const ulong FlipPosition = 1;
    /// <summary>The sample's dropout seed (64 bits), mixed with each dropout layer's index.</summary>
    public const ulong DropoutPosition = 2;
    /// <summary>Whether a class-conditional sample's label is dropped (uniform &lt; label-dropout).</summary>
    public const ulong LabelDropoutPosition = 3;

    // ---- derivations ----
    /// <summary>The key of one training sample of one step; the epoch tells apart two copies of an index in a batch spanning epochs.</summary>
    public static ulong TrainingSample(long runSeed, long step, long epoch, long datasetIndex) => SeedMix.Mix(runSeed, step, epoch, datasetIndex);

    /// <summary>The epsilon stream of a training sample.</summary>
    public static ulong TrainingNoise(ulong sampleKey) => SeedMix.Mix(sampleKey, TrainingNoiseTag);

    /// <summary>The torch generator seed of one dropout layer (construction index <paramref name="layerIndex"/>) for one sample.</summary>
    public static long DropoutLayer(long sampleDropoutSeed, long layerIndex) => unchecked((long)SeedMix.Mix(sampleDropoutSeed, layerIndex));

    /// <summary>Sampling chain <paramref name="index"/> of stream <paramref name="seed"/>: x_T from its positions 0...</summary>
    public static ulong SamplingChain(long seed, long index) => SeedMix.Mix(seed, index, (long)SamplingTag);

    /// <summary>The noise of the sampler's step at <paramref name="position"/> (0-based) of a chain.</summary>
    public static ulong SamplingStepNoise(ulong chainKey, int position) => SeedMix.Mix(chainKey, (ulong)(position + 1));

    /// <summary>The key of epoch <paramref name="epoch"/>'s permutation (Fisher-Yates, value i at position i).</summary>
    public static ulong EpochPermutation(long runSeed, long epoch) => SeedMix.Mix(runSeed, epoch, (long)DataOrderTag);

    /// <summary>Evaluation's q(x_t | x_0) noise for held-out image <paramref name="imageIndex"/> at timestep index <paramref name="t"/>.</summary>
    public static ulong BitsPerDimNoise(long evalSeed, long imageIndex, int t) => SeedMix.Mix(evalSeed, imageIndex, t);

    /// <summary>The seed of evaluation's fresh draw <paramref name="k"/> of a synthetic 2-D set.</summary>
    public static long FloorDraw(long runSeed, long evalSeed, int k) => (long)SeedMix.Mix(runSeed, evalSeed, (long)FloorTag + k);

    /// <summary>Sliced-Wasserstein projection direction <paramref name="i"/>.</summary>
    public static ulong SlicedWassersteinDirection(long seed, int i) => SeedMix.Mix(seed, i, (long)SlicedWassersteinTag);

    /// <summary>The seed of the coordinator's --verify-fraction draw for one step.</summary>
    public static int VerifyDraw(long runSeed, long step) => unchecked((int)SeedMix.Mix(runSeed, step, (long)VerifyTag));

    /// <summary>The seed of the synthetic training (<see cref="SyntheticTrainTag"/>) or held-out (<see cref="SyntheticHeldOutTag"/>) points.</summary>
    public static long SyntheticSet(long runSeed, ulong setTag) => (long)SeedMix.Mix(runSeed, (long)setTag);

    /// <summary>The SplitMix state a seed and a sub-stream start from (<c>DeterministicRandom(seed, stream)</c>).</summary>
    public static ulong SplitMixState(long seed, long stream) => SeedMix.Mix(seed, stream);

    /// <summary>Torch's generator before a fresh run's weights are initialized: the run seed itself.</summary>
    public static long WeightInit(long runSeed) => runSeed;

    /// <summary>The torch generator seed of the evaluation classifier's initial weights.</summary>
    public static long ClassifierInit(long classifierSeed) => unchecked((long)SeedMix.Mix(classifierSeed, (long)ClassifierTag, 0));

    /// <summary>The SplitMix state of the evaluation classifier's batch order in epoch <paramref name="epoch"/> (0-based).</summary>
    public static ulong ClassifierEpochOrder(long classifierSeed, int epoch) => SeedMix.Mix(classifierSeed, (long)ClassifierTag, epoch + 1L);

    private static readonly KeyPart AnyStep = KeyPart.Var("step");
    private static readonly KeyPart AnyIndex = KeyPart.Var("index");
    private static readonly KeyPart DatasetKindValue = KeyPart.Var("dataset kind", 2);   // the synthetic kinds: 0..2

    /// <summary>Every stream, with its derivation.</summary>
    public static IReadOnlyList<RandomStream> Streams { get; } =
    [
        new("training sample", RandomConsumer.CounterRng, "run seed", [AnyStep, KeyPart.Var("epoch"), KeyPart.Var("dataset index")],
            $"TrainingStep.Draw: t at position {TimestepPosition}, flip at {FlipPosition}, dropout seed at {DropoutPosition}, label dropout at {LabelDropoutPosition}"),
        new("training noise", RandomConsumer.CounterRng, "run seed", [AnyStep, KeyPart.Var("epoch"), KeyPart.Var("dataset index"), KeyPart.Tag(TrainingNoiseTag)],
            "TrainingStep.Loss: epsilon"),
        new("dropout layer", RandomConsumer.TorchGenerator, "sample dropout seed", [KeyPart.Var("layer index")],
            "SampleDropout: the mask of one sample in one layer"),
        new("weight init", RandomConsumer.TorchGenerator, "run seed", [], "ModelFactory: a fresh run's weights"),
        new("sampling chain", RandomConsumer.CounterRng, "request seed", [AnyIndex, KeyPart.Tag(SamplingTag)], "SamplingPipeline: x_T"),
        new("sampling step noise", RandomConsumer.CounterRng, "request seed", [AnyIndex, KeyPart.Tag(SamplingTag), KeyPart.Var("step position + 1", int.MaxValue, 1)],
            "SamplingPipeline: the noise of each step"),
        new("data order", RandomConsumer.CounterRng, "run seed", [KeyPart.Var("epoch"), KeyPart.Tag(DataOrderTag)], "DataOrder: an epoch's permutation"),
        new("bits/dim noise", RandomConsumer.CounterRng, "eval seed", [KeyPart.Var("image index"), KeyPart.Var("t", int.MaxValue - 1)], "Evaluator: bits/dim"),
        new("sliced Wasserstein", RandomConsumer.CounterRng, "metric seed", [AnyIndex, KeyPart.Tag(SlicedWassersteinTag)], "SlicedWasserstein: directions"),
        new("floor draw", RandomConsumer.SplitMixState, "run seed", [KeyPart.Var("eval seed"), KeyPart.Var("FloorTag + k", FloorTag + 255, FloorTag), DatasetKindValue],
            "Evaluator: fresh 2-D draws"),
        new("synthetic training set", RandomConsumer.SplitMixState, "run seed", [KeyPart.Tag(SyntheticTrainTag), DatasetKindValue], "DatasetLoader, Synthetic2D"),
        new("synthetic held-out set", RandomConsumer.SplitMixState, "run seed", [KeyPart.Tag(SyntheticHeldOutTag), DatasetKindValue], "DatasetLoader, Synthetic2D"),
        new("image split", RandomConsumer.SplitMixState, "run seed", [KeyPart.Tag(SplitTag)], "Dataset.Split"),
        new("classifier init", RandomConsumer.TorchGenerator, "classifier seed", [KeyPart.Tag(ClassifierTag), KeyPart.Tag(0)],
            "DigitClassifier: the evaluation classifier's initial weights"),
        new("classifier batch order", RandomConsumer.SplitMixState, "classifier seed", [KeyPart.Tag(ClassifierTag), KeyPart.Var("epoch + 1", int.MaxValue, 1)],
            "DigitClassifier.Train: an epoch's permutation"),
        new("verify draw", RandomConsumer.SystemRandom, "run seed", [AnyStep, KeyPart.Tag(VerifyTag)], "StepDriver: --verify-fraction (coordinator)"),
    ];

    /// <summary>
    /// The pairs of streams not kept apart for every input by the rule above, and why they still do not meet.
    /// </summary>
    public static IReadOnlyList<(string A, string B, string Why)> Overlaps { get; } =
    [
        ("training sample", "sampling step noise",
            $"only a run seed equal to a request seed, at epoch {SamplingTag} (0x{SamplingTag:X}): no run gets there"),
        ("bits/dim noise", "sliced Wasserstein",
            $"only at t = {SlicedWassersteinTag}: bits/dim is measured on images, the sliced-Wasserstein distance on 2-D points, never in one evaluation"),
        ("bits/dim noise", "sampling chain", $"only at t = {SamplingTag}: T is far smaller"),
        ("bits/dim noise", "data order", $"only at t = {DataOrderTag}: T is far smaller"),
    ];

    /// <summary>Are the two streams kept apart for every input by some part (rule in <see cref="Randomness"/>)?</summary>
    public static bool Separated(RandomStream a, RandomStream b)
    {
        ArgumentNullException.ThrowIfNull(a);
        ArgumentNullException.ThrowIfNull(b);
        if (a.Consumer != b.Consumer || a.Parts.Count != b.Parts.Count) return true;
        for (var i = 0; i < a.Parts.Count; i++)
            if ((a.Parts[i].IsTag || b.Parts[i].IsTag) && !a.Parts[i].Overlaps(b.Parts[i])) return true;
        return false;
    }
}
