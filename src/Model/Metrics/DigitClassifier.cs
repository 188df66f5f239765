using System.Diagnostics;
using DistDiffusion.Model.Data;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Metrics;

/// <summary>
/// How the evaluation classifier is built and trained. Every field is part of its cache key: a cached classifier
/// trained with other values is stale.
/// </summary>
public sealed record ClassifierConfig
{
    public long Seed { get; init; }
    public int Epochs { get; init; } = 6;
    public int BatchSize { get; init; } = 64;
    public double LearningRate { get; init; } = 2e-3;
    public int Conv1Channels { get; init; } = 16;
    public int Conv2Channels { get; init; } = 32;
    /// <summary>Width of the penultimate layer: the feature space of the classifier FID.</summary>
    public int Features { get; init; } = 128;
    /// <summary>Train on the first this many training images only (0: all); a knob for fast tests.</summary>
    public int TrainLimit { get; init; }

    public static ClassifierConfig Default { get; } = new();

    public void Validate()
    {
        static void Check(bool ok, string field, object value, string expected)
        {
            if (!ok) throw new ArgumentException($"classifier {field} = {value}: expected {expected}");
        }
        Check(Epochs >= 1, "epochs", Epochs, "an integer >= 1");
        Check(BatchSize >= 1, "batch size", BatchSize, "an integer >= 1");
        Check(LearningRate > 0 && double.IsFinite(LearningRate), "learning rate", LearningRate, "a finite number > 0");
        Check(Conv1Channels >= 1, "conv1 channels", Conv1Channels, "an integer >= 1");
        Check(Conv2Channels >= 1, "conv2 channels", Conv2Channels, "an integer >= 1");
        Check(Features >= 2, "features", Features, "an integer >= 2");
        Check(TrainLimit >= 0, "train limit", TrainLimit, "0 (all) or a positive count");
    }
}

/// <summary>
/// A small CNN that labels data-set images; its penultimate layer is the feature space of the "FID with a
/// data-set classifier". conv 3x3 (C1) - ReLU - maxpool 2 - conv 3x3 (C2) - ReLU - maxpool 2 - dense (F) - ReLU - dense (classes).
/// Input: images in [-1, 1] as [N, C, H, W] (H, W >= 4).
/// </summary>
public sealed class DigitClassifier : nn.Module<Tensor, Tensor>
{
    private readonly Conv2d conv1;
    private readonly Conv2d conv2;
    private readonly Linear fc;
    private readonly Linear head;

    public DigitClassifier(long[] imageShape, int classes, ClassifierConfig config) : base("digit_classifier")
    {
        ArgumentNullException.ThrowIfNull(imageShape);
        ArgumentNullException.ThrowIfNull(config);
        config.Validate();
        if (imageShape.Length != 3 || imageShape[0] < 1 || imageShape[1] < 4 || imageShape[2] < 4)
            throw new ArgumentException($"classifier image shape [{string.Join(", ", imageShape)}]: expected [C, H, W] with C >= 1 and H, W >= 4", nameof(imageShape));
        if (classes < 2)
            throw new ArgumentException($"classifier classes = {classes}: expected at least 2", nameof(classes));
        ImageShape = imageShape.ToArray();
        Classes = classes;
        Config = config;
        ConvolutionCheck.Ensure();   // once per process, before the first convolution (it flips a process-wide switch while it runs)
        lock (Randomness.GlobalGeneratorLock)   // the constructors draw from torch's global generator (weights replaced below)
        {
            conv1 = nn.Conv2d(imageShape[0], config.Conv1Channels, 3, padding: 1);
            conv2 = nn.Conv2d(config.Conv1Channels, config.Conv2Channels, 3, padding: 1);
            fc = nn.Linear(config.Conv2Channels * (imageShape[1] / 4) * (imageShape[2] / 4), config.Features);
            head = nn.Linear(config.Features, classes);
        }
        RegisterComponents();
        Initialize(Randomness.ClassifierInit(config.Seed));
    }

    public long[] ImageShape { get; }

    public int Classes { get; }

    public ClassifierConfig Config { get; }

    /// <summary>Penultimate features [N, F] (after the ReLU).</summary>
    public Tensor Features(Tensor x)
    {
        var h = nn.functional.max_pool2d(nn.functional.relu(conv1.forward(x)), 2);
        h = nn.functional.max_pool2d(nn.functional.relu(conv2.forward(h)), 2);
        return nn.functional.relu(fc.forward(h.flatten(1)));
    }

    /// <summary>Logits [N, classes].</summary>
    public override Tensor forward(Tensor x) => head.forward(Features(x));

    /// <summary>
    /// Features [N, F] and softmax probabilities [N, classes] of images [N, C, H, W] (float32, CPU), in
    /// evaluation mode without gradients, in batches.
    /// </summary>
    public (Tensor Features, Tensor Probabilities) Predict(Tensor images, int batchSize = 500)
    {
        ArgumentNullException.ThrowIfNull(images);
        if (images.dim() != 4 || !images.shape.AsSpan(1).SequenceEqual(ImageShape))
            throw new ArgumentException($"classifier input must be [N, {string.Join(", ", ImageShape)}], got [{string.Join(", ", images.shape)}]", nameof(images));
        using var noGrad = no_grad();
        eval();
        var features = new List<Tensor>();
        var probabilities = new List<Tensor>();
        try
        {
            for (long start = 0; start < images.shape[0]; start += batchSize)
            {
                using var scope = NewDisposeScope();
                var x = images.narrow(0, start, Math.Min(batchSize, images.shape[0] - start)).to(ScalarType.Float32).cpu();
                var f = Features(x);
                features.Add(f.DetachFromDisposeScope());
                probabilities.Add(nn.functional.softmax(head.forward(f), 1).DetachFromDisposeScope());
            }
            if (features.Count == 0)
                return (zeros(0, Config.Features), zeros(0, Classes));
            return (cat(features, 0), cat(probabilities, 0));
        }
        finally
        {
            foreach (var t in features) t.Dispose();
            foreach (var t in probabilities) t.Dispose();
        }
    }

    /// <summary>Share of <paramref name="data"/>'s images whose most probable class is their label.</summary>
    public double Accuracy(Dataset data)
    {
        ArgumentNullException.ThrowIfNull(data);
        var labels = data.Labels ?? throw new ArgumentException($"dataset '{data.Description}' has no labels", nameof(data));
        var (features, probabilities) = Predict(data.Data);
        using (features)
        using (probabilities)
        using (var predicted = probabilities.argmax(1))
        using (var hits = predicted.eq(labels))
            return hits.to(ScalarType.Float64).mean().item<double>();
    }

    /// <summary>
    /// A classifier trained on <paramref name="train"/>'s labelled images: Adam, cross-entropy, a fixed number of epochs,
    /// batch order from <see cref="Randomness.ClassifierEpochOrder"/>. Deterministic for a given thread count.
    /// <paramref name="onEpoch"/> gets (epoch number from 1, mean training loss).
    /// </summary>
    public static DigitClassifier Train(Dataset train, ClassifierConfig config, Action<int, double>? onEpoch = null)
    {
        ArgumentNullException.ThrowIfNull(train);
        ArgumentNullException.ThrowIfNull(config);
        config.Validate();
        var labels = train.Labels ?? throw new ArgumentException($"dataset '{train.Description}' has no labels: the classifier needs labelled images", nameof(train));
        if (train.SampleShape.Length != 3)
            throw new ArgumentException($"dataset '{train.Description}' holds [{string.Join(", ", train.SampleShape)}] samples, not images [C, H, W]", nameof(train));
        var n = config.TrainLimit > 0 ? Math.Min(config.TrainLimit, train.Count) : train.Count;
        if (n < 2) throw new ArgumentException($"dataset '{train.Description}': the classifier needs at least 2 training images, got {n}", nameof(train));
        var minLabel = labels.min().item<long>();
        var classes = labels.max().item<long>() + 1;
        if (minLabel < 0 || classes > 10_000)
            throw new ArgumentException($"dataset '{train.Description}': labels must lie in [0, 10000), got [{minLabel}, {classes - 1}]", nameof(train));

        var model = new DigitClassifier(train.SampleShape, (int)Math.Max(2, classes), config);
        try
        {
            model.train();
            using var optimizer = optim.Adam(model.parameters(), lr: config.LearningRate);
            var order = new long[n];
            for (var epoch = 0; epoch < config.Epochs; epoch++)
            {
                for (long i = 0; i < n; i++) order[i] = i;
                var rng = new DeterministicRandom(Randomness.ClassifierEpochOrder(config.Seed, epoch));
                for (var i = n - 1; i > 0; i--)
                {
                    var j = rng.NextLong(i + 1);
                    (order[i], order[j]) = (order[j], order[i]);
                }
                double lossSum = 0;
                var batches = 0;
                for (long start = 0; start < n; start += config.BatchSize)
                {
                    using var scope = NewDisposeScope();
                    var len = (int)Math.Min(config.BatchSize, n - start);
                    var idx = tensor(order.AsSpan((int)start, len).ToArray(), dtype: ScalarType.Int64);
                    var x = train.Data.index_select(0, idx);
                    var y = labels.index_select(0, idx);
                    optimizer.zero_grad();
                    var loss = nn.functional.cross_entropy(model.forward(x), y);
                    loss.backward();
                    optimizer.step();
                    lossSum += loss.item<float>();
                    batches++;
                }
                onEpoch?.Invoke(epoch + 1, lossSum / batches);
            }
            model.eval();
            return model;
        }
        catch
        {
            model.Dispose();
            throw;
        }
    }

    /// <summary>PyTorch's default bounds (uniform +-1/sqrt(fan_in) for weights and biases), drawn from a generator of our own.</summary>
    private void Initialize(long seed)
    {
        using var generator = new Generator((ulong)seed);
        using var noGrad = no_grad();
        foreach (var layer in new nn.Module[] { conv1, conv2, fc, head })
        {
            var weight = layer switch { Conv2d c => c.weight!, Linear l => l.weight!, _ => throw new UnreachableException() };
            var bias = layer switch { Conv2d c => c.bias, Linear l => l.bias, _ => throw new UnreachableException() };
            var bound = 1.0 / Math.Sqrt(weight.numel() / weight.shape[0]);
            weight.uniform_(-bound, bound, generator);
            bias?.uniform_(-bound, bound, generator);
        }
    }
}
