using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Networks;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Training;

/// <summary>The random choices for a set of samples in one step: t [n] int64, epsilon [n, ...], flips, dropout seeds, and
/// which samples train the unconditional model (label replaced by "no label"; all false for unconditional recipes).</summary>
public sealed record SampleDraws(long[] Timesteps, ulong[] NoiseKeys, bool[] Flips, long[] DropoutSeeds, bool[] DropLabels);

/// <summary>
/// The loss of one training step on any subset of the global batch (Ho et al. Algorithm 1).
/// Sample i of step s draws its t, epsilon, flip and dropout masks from streams keyed by
/// (run seed, s, epoch it was drawn in, dataset index of i), and its loss is scaled for the global batch size, so the
/// sum of the gradients of any partition of the batch equals the gradient of the whole batch.
/// </summary>
public sealed class TrainingStep
{
    /// <param name="labelDropout">class-conditional recipes: the share of samples trained with the "no label" token.</param>
    public TrainingStep(GaussianDiffusion diffusion, long runSeed, bool randomFlip, double labelDropout = 0)
    {
        if (!(labelDropout >= 0 && labelDropout < 1))
            throw new ArgumentOutOfRangeException(nameof(labelDropout), labelDropout, "expected a value in [0, 1)");
        Diffusion = diffusion;
        RunSeed = runSeed;
        RandomFlip = randomFlip;
        LabelDropout = labelDropout;
    }

    public GaussianDiffusion Diffusion { get; }
    public long RunSeed { get; }
    public bool RandomFlip { get; }
    public double LabelDropout { get; }

    /// <summary>The stream of one sample of one step; the epoch tells apart two copies of an index in a batch that spans epochs.</summary>
    public static ulong SampleKey(long runSeed, long step, long epoch, long datasetIndex) => Randomness.TrainingSample(runSeed, step, epoch, datasetIndex);

    /// <summary>The per-sample seeds of a step: one key per (dataset index, epoch) pair.</summary>
    public ulong[] SampleKeys(long step, ReadOnlySpan<long> datasetIndices, ReadOnlySpan<long> epochs)
    {
        if (epochs.Length != datasetIndices.Length)
            throw new ArgumentException($"{datasetIndices.Length} dataset indices but {epochs.Length} epochs");
        var keys = new ulong[datasetIndices.Length];
        for (var i = 0; i < keys.Length; i++) keys[i] = SampleKey(RunSeed, step, epochs[i], datasetIndices[i]);
        return keys;
    }

    /// <summary>Draws t, the epsilon stream, flip and dropout seed of each sample from its key.</summary>
    public SampleDraws Draw(ReadOnlySpan<ulong> sampleKeys)
    {
        var n = sampleKeys.Length;
        var ts = new long[n];
        var noiseKeys = new ulong[n];
        var flips = new bool[n];
        var dropout = new long[n];
        var dropLabels = new bool[n];
        for (var i = 0; i < n; i++)
        {
            var key = sampleKeys[i];
            ts[i] = CounterRng.UniformInt(key, Randomness.TimestepPosition, Diffusion.T);           // t ~ Uniform({1..T}) as index 0..T-1
            flips[i] = RandomFlip && CounterRng.Uniform(key, Randomness.FlipPosition) < 0.5;
            dropout[i] = (long)CounterRng.Bits(key, Randomness.DropoutPosition);
            noiseKeys[i] = Randomness.TrainingNoise(key);                // eps ~ N(0, I) from its own stream
            dropLabels[i] = LabelDropout > 0 && CounterRng.Uniform(key, Randomness.LabelDropoutPosition) < LabelDropout;
        }
        return new SampleDraws(ts, noiseKeys, flips, dropout, dropLabels);
    }

    public SampleDraws Draw(long step, ReadOnlySpan<long> datasetIndices, ReadOnlySpan<long> epochs) =>
        Draw(SampleKeys(step, datasetIndices, epochs));

    /// <summary>
    /// Scalar loss for the samples x0 [n, ...] (on the network's device) with the given dataset indices and epochs:
    /// sum of per-sample losses divided by the global batch size (mean reduction) or not (sum reduction).
    /// Call backward on it; gradients of the parts of a batch add up to the whole batch's gradient.
    /// </summary>
    public Tensor Loss(DenoiserNetwork network, Tensor x0, long step, ReadOnlySpan<long> datasetIndices, ReadOnlySpan<long> epochs, int globalBatchSize, long[]? labels = null) =>
        Loss(network, x0, SampleKeys(step, datasetIndices, epochs), globalBatchSize, labels);

    /// <summary>The same loss with each sample's seed given directly (what a distributed worker receives).</summary>
    /// <param name="labels">the samples' class labels [n] (0..Classes-1), required exactly when the network is class-conditional.</param>
    public Tensor Loss(DenoiserNetwork network, Tensor x0, ReadOnlySpan<ulong> sampleKeys, int globalBatchSize, long[]? labels = null)
    {
        if (x0.shape[0] != sampleKeys.Length)
            throw new ArgumentException($"x0 has {x0.shape[0]} samples but {sampleKeys.Length} sample seeds were given");
        if (globalBatchSize < sampleKeys.Length)
            throw new ArgumentException($"global batch size {globalBatchSize} is smaller than this part ({sampleKeys.Length})");
        var draws = Draw(sampleKeys);
        var trainedLabels = TrainedLabels(network, labels, draws.DropLabels);
        var device = x0.device;
        if (draws.Flips.Any(f => f))
        {
            var mask = tensor(draws.Flips, device: device).reshape(BroadcastShape(x0));
            x0 = where(mask, x0.flip(-1), x0);                            // horizontal flip of [C, H, W] images
        }
        var t = tensor(draws.Timesteps, ScalarType.Int64, device);
        var eps = CounterRng.NormalRows(draws.NoiseKeys, x0.shape[1..], device);
        var xt = Diffusion.QSample(x0, t, eps);
        network.SetSampleSeeds(draws.DropoutSeeds);
        network.SetClassLabels(trainedLabels);
        try
        {
            var output = network.forward(xt, t);
            var perSample = Diffusion.TrainingLosses(output, x0, xt, t, eps);   // [n]
            var total = perSample.sum();
            return Diffusion.Reduction == LossReduction.Mean ? total / globalBatchSize : total;
        }
        finally
        {
            network.SetSampleSeeds(null);
            network.SetClassLabels(null);
        }
    }

    /// <summary>Each sample's label as the network is trained on it: the data set's, or "no label" where the draw dropped it.</summary>
    private static long[]? TrainedLabels(DenoiserNetwork network, long[]? labels, bool[] dropLabels)
    {
        if (network.Classes == 0)
        {
            if (labels is not null) throw new ArgumentException("class labels given for an unconditional network (recipe field classes = 0)");
            return null;
        }
        if (labels is null)
            throw new ArgumentException($"the network is class-conditional ({network.Classes} classes) but the samples have no labels: expected a labelled data set");
        if (labels.Length != dropLabels.Length)
            throw new ArgumentException($"{labels.Length} labels for {dropLabels.Length} samples");
        var trained = new long[labels.Length];
        for (var i = 0; i < labels.Length; i++)
        {
            if (labels[i] < 0 || labels[i] >= network.Classes)
                throw new ArgumentException($"class label {labels[i]} of sample {i}: expected 0..{network.Classes - 1} (recipe field classes = {network.Classes})");
            trained[i] = dropLabels[i] ? network.NullLabel : labels[i];
        }
        return trained;
    }

    private static long[] BroadcastShape(Tensor x)
    {
        var shape = new long[x.dim()];
        Array.Fill(shape, 1L);
        shape[0] = x.shape[0];
        return shape;
    }
}
