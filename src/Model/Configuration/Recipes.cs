using DistDiffusion.Model.Data;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Networks;

namespace DistDiffusion.Model.Configuration;

/// <summary>
/// Named recipes. The reference recipes reproduce the systems of the documents the project started from with
/// their values, even where those are unsound (see README); <c>swissroll</c> and <c>mnist-small</c> are
/// the project's own.
/// </summary>
public static class Recipes
{
    /// <summary>Sohl-Dickstein et al. (2015) on the swiss roll: T = 40, per-step heads, learned mean and variance, KL loss.</summary>
    public static Recipe SwissRollSohl2015 { get; } = new()
    {
        Name = "swissroll-sohl2015",
        Dataset = DatasetKind.SwissRoll,
        Timesteps = 40,
        BetaSchedule = BetaSchedule.Sigmoid,
        BetaStart = 1e-4,
        BetaEnd = 0.2,
        Network = NetworkKind.Sohl2015Mlp,
        HiddenSize = 128,
        HiddenLayers = 3,
        Prediction = PredictionType.Mean,
        Variance = VarianceType.LearnedRange,
        Loss = LossType.Kl,
        Reduction = LossReduction.Mean,
        BatchSize = 128,
        // Two micro-batches of 64, as for `swissroll`: split 8 ways, this small MLP ran at half the speed (221 vs 446 steps/s
        // for swissroll-ddpm with 8 and 1). The split changes the summation order, not the gradient's mathematics.
        MicroBatches = 2,
        LearningRate = 1e-3,
        Steps = 6000,
        EmaDecay = 0.995,
        CheckpointEvery = 2000,
        SampleEvery = 2000,
    };

    /// <summary>The seeds' DDPM swiss roll: T = 50, beta 1e-4..0.02 (alpha-bar_T ~ 0.6: unsound, kept), 4 hidden ReLU layers, Adam, batch 128.</summary>
    public static Recipe SwissRollDdpm { get; } = new()
    {
        Name = "swissroll-ddpm",
        Dataset = DatasetKind.SwissRoll,
        Timesteps = 50,
        BetaSchedule = BetaSchedule.Linear,
        BetaStart = 1e-4,
        BetaEnd = 0.02,
        Network = NetworkKind.Mlp,
        HiddenSize = 128,
        HiddenLayers = 4,
        BatchSize = 128,
        MicroBatches = 2,   // as swissroll-sohl2015
        LearningRate = 1e-3,
        Steps = 6000,
        EmaDecay = 0.995,
        CheckpointEvery = 2000,
        SampleEvery = 2000,
    };

    /// <summary>The project's own 2-D recipe and the demo default.</summary>
    public static Recipe SwissRoll { get; } = new()
    {
        Name = "swissroll",
        Dataset = DatasetKind.SwissRoll,
        // T = 200 with beta up to 0.05: alpha-bar_T ~ 0.006, so x_T really is close to N(0, I).
        Timesteps = 200,
        BetaSchedule = BetaSchedule.Linear,
        BetaStart = 1e-4,
        BetaEnd = 0.05,
        Network = NetworkKind.Mlp,
        HiddenSize = 256,
        HiddenLayers = 4,
        // beta-tilde gives sharper 2-D samples than beta at this T.
        Variance = VarianceType.FixedSmall,
        BatchSize = 256,
        // Two micro-batches of 128: this MLP is bound by per-operation overhead at small batches (train on 2 cores:
        // 92 steps/s with 2, 84 with 4, 70 with 8), so it is split for at most two workers (more stand by as spares).
        MicroBatches = 2,
        LearningRate = 2e-3,
        // 8,000 steps: ratio 0.77-0.93 over two seeds; 4,000 steps varied from 1.30 to 1.69.
        Steps = 8000,
        EmaDecay = 0.999,
        CheckpointEvery = 4000,
        SampleEvery = 4000,
    };

    /// <summary>The seeds' MNIST DDPM: T = 50, beta 1e-4..0.1, U-Net 128 channels (1,2,2), 2 res blocks, dropout 0.1, Adam 2e-4, summed squared error.</summary>
    public static Recipe MnistDdpm { get; } = new()
    {
        Name = "mnist-ddpm",
        Dataset = DatasetKind.Mnist,
        DataPath = "data/mnist",
        Timesteps = 50,
        BetaSchedule = BetaSchedule.Linear,
        BetaStart = 1e-4,
        BetaEnd = 0.1,
        Network = NetworkKind.UNet,
        UNetLayout = UNetLayout.Annotated,
        BaseChannels = 128,
        ChannelMultipliers = [1, 2, 2],
        ResBlocks = 2,
        GroupNormGroups = 8,
        Dropout = 0.1,
        LearningRate = 2e-4,
        Reduction = LossReduction.Sum,
        BatchSize = 128,
        ClipDenoised = true,
        Steps = 20_000,
        EmaDecay = 0.999,
        CheckpointEvery = 1000,
        SampleEvery = 1000,
    };

    /// <summary>The project's CPU-sized MNIST recipe: mnist-ddpm's forward process on a 16-channel U-Net with a mean loss; about 17 minutes here.</summary>
    public static Recipe MnistSmall { get; } = MnistDdpm with
    {
        Name = "mnist-small",
        BaseChannels = 16,
        ChannelMultipliers = [1, 2, 2],
        ResBlocks = 1,
        GroupNormGroups = 8,
        AttentionHeads = 2,
        AttentionHeadSize = 16,
        Dropout = 0.0,
        Reduction = LossReduction.Mean,
        LearningRate = 2e-3,
        BatchSize = 64,
        Steps = 1500,
        EmaDecay = 0.995,
        CheckpointEvery = 500,
        SampleEvery = 500,
    };

    /// <summary>
    /// The project's MNIST recipe for a 2-core CPU: about 20 minutes with `coordinator run --workers 2` (README: image quality).
    /// From mnist-small, measured with the data-set classifier: a cosine schedule over T = 100 (alpha-bar_T ~ 0, so sampling
    /// starts where the forward process ends; mnist-small's linear 0.1 schedule ends at 0.075), 32 channels (at 500 steps 39%
    /// confident samples against 30% for 16 channels, at about half the steps per second), two micro-batches of 32 (one per
    /// worker: larger kernels than eight of 8), a 200-step warm-up and gradient clipping at 1 for the higher rate. A cosine
    /// learning-rate decay with min-SNR-5 loss weights looked better at 1,000 steps but gave the same 79.8% at 2,400
    /// steps with worse bits/dim (README: image quality), so the rate stays constant and the loss uniform.
    /// </summary>
    public static Recipe MnistCpu { get; } = MnistSmall with
    {
        Name = "mnist-cpu",
        Timesteps = 100,
        BetaSchedule = BetaSchedule.Cosine,
        BaseChannels = 32,
        MicroBatches = 2,
        WarmupSteps = 200,
        GradClip = 1,
        EmaDecay = 0.999,
        Steps = 2300,
    };

    /// <summary>
    /// mnist-cpu conditioned on the digit's class, sampled with classifier-free guidance (Ho &amp; Salimans 2022): the same
    /// network, schedule, optimizer and steps, plus a learned 10-class label embedding added to the time embedding, with
    /// 10% of the training samples' labels dropped so the same network is also the unconditional model guidance needs.
    /// Samples are drawn with guidance scale 1.25 (diffusers' convention: out(no label) + 1.25 (out(label) - out(no label)))
    /// and the classes in turn (sample i is digit i mod 10) unless told otherwise. The scale is measured, on a 2,300-step run
    /// with 300 samples each (README: image quality): 1 (no guidance) gave 92.7% confident digits and classifier FID 41.6,
    /// 1.25 98.3% and 50.2, 1.5 99.7% and 63.0, 2 100% and 92.4; 1.25 is the smallest with a wide margin over 90%.
    /// </summary>
    public static Recipe MnistCpuGuided { get; } = MnistCpu with
    {
        Name = "mnist-cpu-guided",
        Classes = 10,
        LabelDropout = 0.1,
        Guidance = 1.25,
        // One grid, at the last step: four guided 64-sample previews on the way (two network passes per step) took the run
        // from 19 min to 20 min 39 s (1,138 vs 1,239 s wall, the same 2,300 steps to the same bits), past the 20-minute budget.
        SampleEvery = 2300,
    };

    /// <summary>The annotated diffusion model's Fashion-MNIST run: T = 300 linear, U-Net width 28 (1,2,4), Huber, Adam 1e-3, batch 128, flips.</summary>
    public static Recipe FashionMnistAnnotated { get; } = new()
    {
        Name = "fashion-mnist-annotated",
        Dataset = DatasetKind.FashionMnist,
        DataPath = "data/fashion-mnist",
        Timesteps = 300,
        BetaSchedule = BetaSchedule.Linear,
        BetaStart = 1e-4,
        BetaEnd = 0.02,
        Network = NetworkKind.UNet,
        UNetLayout = UNetLayout.Annotated,
        BaseChannels = 28,
        ChannelMultipliers = [1, 2, 4],
        ResBlocks = 2,
        GroupNormGroups = 4,
        Loss = LossType.Huber,
        LearningRate = 1e-3,
        BatchSize = 128,
        RandomFlip = true,
        ClipDenoised = true,
        EmaDecay = 0,
        Steps = 2_400,
        CheckpointEvery = 600,
        SampleEvery = 600,
    };

    /// <summary>Ho et al. (2020) CIFAR-10: T = 1000, 35.7M-parameter U-Net, lr 2e-4, batch 128, EMA 0.9999, dropout 0.1, warm-up 5000, grad clip 1, flips.</summary>
    public static Recipe Cifar10Ddpm { get; } = new()
    {
        Name = "cifar10-ddpm",
        Dataset = DatasetKind.ImageFolder,
        DataPath = "data/cifar10",
        ImageSize = 32,
        Timesteps = 1000,
        BetaSchedule = BetaSchedule.Linear,
        BetaStart = 1e-4,
        BetaEnd = 0.02,
        Network = NetworkKind.UNet,
        UNetLayout = UNetLayout.Ho2020,
        BaseChannels = 128,
        ChannelMultipliers = [1, 2, 2, 2],
        ResBlocks = 2,
        AttentionResolutions = [16],
        GroupNormGroups = 32,
        Dropout = 0.1,
        LearningRate = 2e-4,
        BatchSize = 128,
        GradClip = 1.0,
        WarmupSteps = 5000,
        EmaDecay = 0.9999,
        RandomFlip = true,
        ClipDenoised = true,
        Steps = 800_000,
        CheckpointEvery = 10_000,
        SampleEvery = 10_000,
    };

    public static IReadOnlyList<Recipe> All { get; } =
        [SwissRoll, SwissRollDdpm, SwissRollSohl2015, MnistDdpm, MnistSmall, MnistCpu, MnistCpuGuided, FashionMnistAnnotated, Cifar10Ddpm];

    /// <summary>
    /// The recipe named <paramref name="name"/>, or the one written in the file it names when it ends in .json
    /// (<see cref="RecipeFile"/>); <see cref="ArgumentException"/> listing the names otherwise.
    /// </summary>
    public static Recipe Get(string name) =>
        RecipeFile.IsFileName(name)
            ? RecipeFile.Load(name)
            : All.FirstOrDefault(r => string.Equals(r.Name, name, StringComparison.OrdinalIgnoreCase))
              ?? throw new ArgumentException($"unknown recipe '{name}'; expected one of: {string.Join(", ", All.Select(r => r.Name))}, or a recipe file NAME.json");

    /// <summary>One line about a recipe: name, data, network, T, schedule, batch and steps (`coordinator recipes`).</summary>
    public static string Line(Recipe recipe)
    {
        ArgumentNullException.ThrowIfNull(recipe);
        var network = recipe.Network == NetworkKind.UNet
            ? $"unet {recipe.BaseChannels}x({string.Join(",", recipe.ChannelMultipliers)})"
            : $"{Naming.Kebab(recipe.Network.ToString())} {recipe.HiddenLayers}x{recipe.HiddenSize}";
        return string.Create(System.Globalization.CultureInfo.InvariantCulture,
            $"{recipe.Name,-24} {Naming.Kebab(recipe.Dataset.ToString()),-14} {network,-20} T={recipe.Timesteps,-5} {Naming.Kebab(recipe.BetaSchedule.ToString()),-8} batch {recipe.BatchSize,-4} {recipe.Steps,7} steps{(recipe.Classes > 0 ? $", {recipe.Classes} classes, guidance {recipe.Guidance}" : "")}");
    }
}
