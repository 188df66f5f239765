using System.Globalization;
using System.Reflection;
using System.Text.Json;
using System.Text.Json.Serialization;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Networks;
using DistDiffusion.Model.Optimization;

namespace DistDiffusion.Model.Configuration;

/// <summary>
/// Everything that defines a training run: data, forward process, network, loss, optimizer, batch.
/// Immutable; named recipes live in <see cref="Recipes"/> and any field can be overridden with
/// <see cref="With(string, string)"/> (the CLI's <c>--set key=value</c>).
/// </summary>
public sealed record Recipe
{
    public string Name { get; init; } = "custom";

    // ---- data ----
    public DatasetKind Dataset { get; init; } = DatasetKind.SwissRoll;
    /// <summary>Folder (IDX files or images) for image datasets; unused for synthetic 2-D sets.</summary>
    public string? DataPath { get; init; }
    /// <summary>Number of points drawn for a synthetic 2-D set (training split; the held-out split is drawn separately).</summary>
    public int SyntheticSize { get; init; } = 10_000;
    /// <summary>Fraction of an image dataset kept out of training for evaluation (bits/dim).</summary>
    public double HeldOutFraction { get; init; } = 0.1;
    /// <summary>Image side for image folders (resize + centre-crop).</summary>
    public int ImageSize { get; init; } = 32;
    /// <summary>Random horizontal flips of image data, drawn from the per-sample generator.</summary>
    public bool RandomFlip { get; init; }

    // ---- forward process ----
    public int Timesteps { get; init; } = 1000;
    public BetaSchedule BetaSchedule { get; init; } = BetaSchedule.Linear;
    public double BetaStart { get; init; } = 1e-4;
    public double BetaEnd { get; init; } = 0.02;

    // ---- model parameterization and loss ----
    public PredictionType Prediction { get; init; } = PredictionType.Epsilon;
    public VarianceType Variance { get; init; } = VarianceType.FixedLarge;
    public LossType Loss { get; init; } = LossType.L2;
    public LossReduction Reduction { get; init; } = LossReduction.Mean;
    /// <summary>Per-timestep weight of each sample's loss (uniform: L_simple; min-snr: Hang et al. 2023).</summary>
    public LossWeighting LossWeighting { get; init; } = LossWeighting.Uniform;
    /// <summary>The gamma of min-snr loss weighting.</summary>
    public double MinSnrGamma { get; init; } = 5.0;
    /// <summary>Clip the predicted x_0 to [-1, 1] while sampling (image data only makes sense with it).</summary>
    public bool ClipDenoised { get; init; }

    // ---- network ----
    public NetworkKind Network { get; init; } = NetworkKind.Mlp;
    /// <summary>U-Net block layout (see <see cref="UNetLayout"/>).</summary>
    public UNetLayout UNetLayout { get; init; } = UNetLayout.Annotated;
    /// <summary>U-Net (Ho2020 layout): feature-map sides at which full self-attention is used.</summary>
    public int[] AttentionResolutions { get; init; } = [16];
    /// <summary>MLP width (Mlp, Sohl2015Mlp).</summary>
    public int HiddenSize { get; init; } = 128;
    /// <summary>MLP depth (Mlp: hidden layers; Sohl2015Mlp: trunk layers).</summary>
    public int HiddenLayers { get; init; } = 4;
    /// <summary>Sinusoidal time-embedding width (MLPs) ; the U-Net uses 4 x BaseChannels.</summary>
    public int TimeEmbeddingSize { get; init; } = 64;
    /// <summary>U-Net: channels of the first stage.</summary>
    public int BaseChannels { get; init; } = 32;
    /// <summary>U-Net: channel multiplier per resolution stage.</summary>
    public int[] ChannelMultipliers { get; init; } = [1, 2, 4];
    /// <summary>U-Net: ResNet blocks per stage.</summary>
    public int ResBlocks { get; init; } = 2;
    /// <summary>U-Net: attention heads and width per head.</summary>
    public int AttentionHeads { get; init; } = 4;
    public int AttentionHeadSize { get; init; } = 32;
    /// <summary>U-Net: GroupNorm groups.</summary>
    public int GroupNormGroups { get; init; } = 8;
    public double Dropout { get; init; }

    // ---- class conditioning (classifier-free guidance, Ho & Salimans 2022) ----
    /// <summary>U-Net: 0 for an unconditional model, else the data set's number of classes; the network then adds a
    /// learned embedding of the label (or of the "no label" token, index = Classes) to its time embedding.</summary>
    public int Classes { get; init; }
    /// <summary>The share of training samples whose label is replaced by the "no label" token, so one network also learns
    /// the unconditional model that guidance extrapolates from (drawn per sample from its key, like t).</summary>
    public double LabelDropout { get; init; } = 0.1;
    /// <summary>The guidance scale s sampling uses unless told otherwise: output = out(no label) + s (out(label) - out(no label)),
    /// diffusers' guidance_scale. 1 samples the conditional model alone (one network pass), 0 the unconditional one.</summary>
    public double Guidance { get; init; } = 1;

    // ---- optimization ----
    public int BatchSize { get; init; } = 128;
    /// <summary>
    /// The global batch is cut into this many micro-batches (at most batch-size) whatever the number of workers; their
    /// gradients are added in one fixed pairwise tree (see MicroBatchTree), so every worker count gives the same bits.
    /// At most this many workers share a step.
    /// </summary>
    public int MicroBatches { get; init; } = 8;
    public int Steps { get; init; } = 10_000;
    public double LearningRate { get; init; } = 1e-3;
    public double AdamBeta1 { get; init; } = 0.9;
    public double AdamBeta2 { get; init; } = 0.999;
    public double AdamEpsilon { get; init; } = 1e-8;
    public double WeightDecay { get; init; }
    /// <summary>Clip the global gradient norm to this value (0: no clipping).</summary>
    public double GradClip { get; init; }
    /// <summary>Linear learning-rate warm-up over this many steps (0: none).</summary>
    public int WarmupSteps { get; init; }
    /// <summary>After the warm-up: a constant rate (none) or a cosine decay to <see cref="MinLearningRate"/> at the run's last step (<see cref="Steps"/>).</summary>
    public LearningRateDecay LearningRateDecay { get; init; } = LearningRateDecay.None;
    /// <summary>Where a learning-rate decay ends.</summary>
    public double MinLearningRate { get; init; }
    /// <summary>Exponential moving average decay of the weights (0: no EMA, sampling uses the raw weights).</summary>
    public double EmaDecay { get; init; } = 0.999;

    // ---- run ----
    public long Seed { get; init; }
    public int CheckpointEvery { get; init; } = 1000;
    public int SampleEvery { get; init; } = 1000;

    /// <summary>Is the data an image ([C, H, W]) rather than a point ([2])?</summary>
    [JsonIgnore]
    public bool IsImageData => Dataset is DatasetKind.Mnist or DatasetKind.FashionMnist or DatasetKind.ImageFolder;

    /// <summary>Shape of one training example: [2] for points, [C, H, W] for images.</summary>
    [JsonIgnore]
    public long[] SampleShape => Dataset switch
    {
        DatasetKind.Mnist or DatasetKind.FashionMnist => [1, 28, 28],
        DatasetKind.ImageFolder => [3, ImageSize, ImageSize],
        _ => [2],
    };

    public static readonly JsonSerializerOptions JsonOptions = new()
    {
        WriteIndented = true,
        Converters = { new JsonStringEnumConverter() },
    };

    public string ToJson() => JsonSerializer.Serialize(this, JsonOptions);

    public static Recipe FromJson(string json) =>
        JsonSerializer.Deserialize<Recipe>(json, JsonOptions) ?? throw new FormatException("recipe JSON is null");

    /// <summary>Field names accepted by <see cref="With(string, string)"/>, in kebab-case.</summary>
    public static IReadOnlyList<string> FieldNames { get; } =
        typeof(Recipe).GetProperties(BindingFlags.Public | BindingFlags.Instance)
            .Where(p => p.CanWrite && p.GetCustomAttribute<JsonIgnoreAttribute>() is null)
            .Select(p => Naming.Kebab(p.Name)).ToArray();

    /// <summary>A copy with one field set from text, e.g. <c>With("learning-rate", "2e-4")</c>. Not validated: fields that
    /// depend on each other (loss and variance, channels and groups) may be set in any order; call <see cref="Validate"/> after.</summary>
    /// <exception cref="ArgumentException">unknown field or a value that does not parse, naming both.</exception>
    public Recipe With(string key, string value) => With(Field(key), value);

    /// <summary>
    /// A copy with one field set from a JSON value (a recipe file's, see <see cref="RecipeFile"/>): a string's text, a
    /// number's or a boolean's literal, an array of integers as their comma-separated list, each read as
    /// <see cref="With(string, string)"/> reads text, so the errors are --set's; null unsets data-path. Not validated.
    /// </summary>
    /// <exception cref="ArgumentException">unknown field or a value that does not parse, naming both.</exception>
    public Recipe With(string key, JsonElement value)
    {
        var prop = Field(key);
        var isList = prop.PropertyType == typeof(int[]);
        var text = value.ValueKind switch
        {
            JsonValueKind.String => value.GetString(),
            JsonValueKind.Number or JsonValueKind.True or JsonValueKind.False => value.GetRawText(),
            JsonValueKind.Array when isList && value.EnumerateArray().All(e => e.ValueKind == JsonValueKind.Number) =>
                string.Join(",", value.EnumerateArray().Select(e => e.GetRawText())),
            JsonValueKind.Null when prop.PropertyType == typeof(string) => null,
            JsonValueKind.Null => throw new ArgumentException($"recipe field '{Naming.Kebab(prop.Name)}': cannot use null: expected {Describe(prop.PropertyType)}"),
            _ => throw new ArgumentException($"recipe field '{Naming.Kebab(prop.Name)}': cannot use {RecipeFile.Kind(value.ValueKind)} {value.GetRawText()}: expected {Describe(prop.PropertyType)}"),
        };
        if (text is not null) return With(prop, text);
        var copy = this with { };
        prop.SetValue(copy, null);
        return copy;
    }

    /// <summary>The settable recipe field <paramref name="key"/> names (any case, dashes or underscores ignored).</summary>
    private static PropertyInfo Field(string key)
    {
        var wanted = Normalize(key);
        return typeof(Recipe).GetProperties(BindingFlags.Public | BindingFlags.Instance)
            .FirstOrDefault(p => p.CanWrite && p.GetCustomAttribute<JsonIgnoreAttribute>() is null && Normalize(p.Name) == wanted)
            ?? throw new ArgumentException($"unknown recipe field '{key}'; expected one of: {string.Join(", ", FieldNames)}");
    }

    private Recipe With(PropertyInfo prop, string value)
    {
        object? parsed;
        try
        {
            parsed = ParseValue(prop.PropertyType, value);
        }
        catch (Exception e) when (e is FormatException or OverflowException or ArgumentException)
        {
            throw new ArgumentException($"recipe field '{Naming.Kebab(prop.Name)}': cannot use '{value}': expected {Describe(prop.PropertyType)}", e);
        }
        var copy = this with { };
        prop.SetValue(copy, parsed);
        return copy;
    }

    /// <summary>Applies <c>key=value</c> overrides in order, then validates the result.</summary>
    public Recipe WithOverrides(IEnumerable<string> assignments)
    {
        var r = this;
        foreach (var a in assignments)
        {
            var eq = a.IndexOf('=', StringComparison.Ordinal);
            if (eq <= 0)
                throw new ArgumentException($"override '{a}' is not of the form key=value");
            r = r.With(a[..eq].Trim(), a[(eq + 1)..].Trim());
        }
        r.Validate();
        return r;
    }

    private static void Check(bool ok, string field, object value, string expected)
    {
        if (!ok)
            throw new ArgumentException($"recipe field '{field}' = {Convert.ToString(value, CultureInfo.InvariantCulture)}: expected {expected}");
    }

    /// <summary>
    /// Checks every field's range and that the network can be built for <see cref="SampleShape"/>; throws
    /// <see cref="ArgumentException"/> naming the field, the value and what was expected. The one place recipes are checked.
    /// </summary>
    public void Validate()
    {
        Check(Timesteps >= 1, "timesteps", Timesteps, "an integer >= 1");
        Check(BetaStart > 0 && BetaStart < 1, "beta-start", BetaStart, "a value in (0, 1)");
        Check(BetaEnd > 0 && BetaEnd < 1, "beta-end", BetaEnd, "a value in (0, 1)");
        Check(BetaEnd >= BetaStart, "beta-end", BetaEnd, $">= beta-start ({BetaStart.ToString(CultureInfo.InvariantCulture)})");
        Check(BatchSize >= 1, "batch-size", BatchSize, "an integer >= 1");
        Check(MicroBatches >= 1, "micro-batches", MicroBatches, "an integer >= 1 (batches smaller than it use one micro-batch per sample)");
        Check(Steps >= 0, "steps", Steps, "an integer >= 0");
        Check(LearningRate > 0, "learning-rate", LearningRate, "a value > 0");
        Check(AdamBeta1 >= 0 && AdamBeta1 < 1, "adam-beta1", AdamBeta1, "a value in [0, 1)");
        Check(AdamBeta2 >= 0 && AdamBeta2 < 1, "adam-beta2", AdamBeta2, "a value in [0, 1)");
        Check(AdamEpsilon > 0, "adam-epsilon", AdamEpsilon, "a value > 0");
        Check(WeightDecay >= 0, "weight-decay", WeightDecay, "a value >= 0");
        Check(GradClip >= 0, "grad-clip", GradClip, "a value >= 0 (0 disables clipping)");
        Check(WarmupSteps >= 0, "warmup-steps", WarmupSteps, "an integer >= 0");
        Check(MinLearningRate >= 0 && MinLearningRate <= LearningRate, "min-learning-rate", MinLearningRate, $"a value in [0, learning-rate ({LearningRate.ToString(CultureInfo.InvariantCulture)})]");
        Check(MinSnrGamma > 0, "min-snr-gamma", MinSnrGamma, "a value > 0");
        Check(LossWeighting != LossWeighting.MinSnr || (Loss != LossType.Kl && Prediction != PredictionType.Mean), "loss-weighting", LossWeighting,
            "uniform unless the loss regresses an epsilon, x0 or v target (min-snr weights that target's error)");
        Check(EmaDecay >= 0 && EmaDecay < 1, "ema-decay", EmaDecay, "a value in [0, 1) (0 disables EMA)");
        Check(Dropout >= 0 && Dropout < 1, "dropout", Dropout, "a value in [0, 1)");
        Check(Classes >= 0, "classes", Classes, "an integer >= 0 (0: unconditional)");
        Check(Classes == 0 || Dataset is DatasetKind.Mnist or DatasetKind.FashionMnist, "classes", Classes,
            "0 for this data set (class conditioning needs labelled images: mnist or fashion-mnist)");
        Check(LabelDropout >= 0 && LabelDropout < 1, "label-dropout", LabelDropout, "a value in [0, 1)");
        Check(Classes == 0 || LabelDropout > 0 || Guidance == 1, "label-dropout", LabelDropout,
            $"a value > 0 when guidance is {Guidance.ToString(CultureInfo.InvariantCulture)} (guidance needs the unconditional model that label dropout trains)");
        Check(double.IsFinite(Guidance) && Guidance >= 0, "guidance", Guidance, "a finite value >= 0 (1: no guidance)");
        Check(Classes > 0 || Guidance == 1, "guidance", Guidance, "1 for an unconditional model (classes = 0)");
        Check(HiddenSize >= 1, "hidden-size", HiddenSize, "an integer >= 1");
        Check(HiddenLayers >= 1, "hidden-layers", HiddenLayers, "an integer >= 1");
        Check(TimeEmbeddingSize >= 2 && TimeEmbeddingSize % 2 == 0, "time-embedding-size", TimeEmbeddingSize, "an even integer >= 2");
        Check(BaseChannels >= 1, "base-channels", BaseChannels, "an integer >= 1");
        Check(GroupNormGroups >= 1, "group-norm-groups", GroupNormGroups, "an integer >= 1");
        Check(BaseChannels % GroupNormGroups == 0, "group-norm-groups", GroupNormGroups, $"a divisor of base-channels ({BaseChannels})");
        Check(ChannelMultipliers.Length >= 1 && ChannelMultipliers.All(m => m >= 1), "channel-multipliers", string.Join(",", ChannelMultipliers), "a comma-separated list of integers >= 1");
        Check(ResBlocks >= 1, "res-blocks", ResBlocks, "an integer >= 1");
        Check(AttentionHeads >= 1, "attention-heads", AttentionHeads, "an integer >= 1");
        Check(AttentionHeadSize >= 1, "attention-head-size", AttentionHeadSize, "an integer >= 1");
        Check(SyntheticSize >= 2, "synthetic-size", SyntheticSize, "an integer >= 2");
        Check(HeldOutFraction > 0 && HeldOutFraction < 1, "held-out-fraction", HeldOutFraction, "a value in (0, 1)");
        Check(ImageSize >= 4, "image-size", ImageSize, "an integer >= 4");
        Check(CheckpointEvery >= 0, "checkpoint-every", CheckpointEvery, "an integer >= 0 (0: only at the end)");
        Check(SampleEvery >= 0, "sample-every", SampleEvery, "an integer >= 0 (0: only at the end)");
        Check(Variance != VarianceType.LearnedRange || Loss == LossType.Kl, "loss", Loss, "kl when variance is learned-range (a fixed-variance loss gives the variance head no gradient)");
        Check(Loss != LossType.Kl || Variance == VarianceType.LearnedRange, "variance", Variance, "learned-range when loss is kl");
        Check(Prediction != PredictionType.Mean || Loss == LossType.Kl, "prediction", Prediction, "epsilon, x0 or v unless loss is kl (a directly predicted mean has no regression target)");
        Check(!RandomFlip || IsImageData, "random-flip", RandomFlip, "false for 2-D data (a flip would swap the coordinates)");
        Check(!IsImageData || Network == NetworkKind.UNet, "network", Network, "unet for image data");
        Check(IsImageData || Network != NetworkKind.UNet, "network", Network, "mlp or sohl2015-mlp for 2-D data");
        Check(!IsImageData || !string.IsNullOrWhiteSpace(DataPath), "data-path", DataPath ?? "(unset)", "a folder holding the dataset files");
        ValidateNetwork(SampleShape);
    }

    /// <summary>
    /// The network fields alone, for data of per-sample shape <paramref name="dataShape"/> ([D] points, [C, H, W] images):
    /// the checks <see cref="NetworkFactory.Create"/> makes (<see cref="NetworkOptions.Validate"/>), also for shapes other than <see cref="SampleShape"/>.
    /// </summary>
    public void ValidateNetwork(long[] dataShape) => ToNetworkOptions().Validate(dataShape);

    /// <summary>The network fields, as <see cref="NetworkFactory.Create"/> takes them (a method, not a property, so it stays out of the recipe's JSON).</summary>
    public NetworkOptions ToNetworkOptions() => new(
        Network, Dropout, LearnedVariance: Variance == VarianceType.LearnedRange, Classes,
        new MlpOptions(HiddenSize, HiddenLayers, TimeEmbeddingSize, Timesteps),
        new UNetOptions(UNetLayout, BaseChannels, ChannelMultipliers, ResBlocks, GroupNormGroups, AttentionHeads, AttentionHeadSize, AttentionResolutions));

    /// <summary>The data fields, as <see cref="DatasetLoader.Load"/> takes them.</summary>
    public DataOptions ToDataOptions() => new(Dataset, DataPath, SyntheticSize, HeldOutFraction, ImageSize, Seed);

    /// <summary>
    /// A copy whose relative data path is resolved against the working directory, then against the folders above
    /// the executable (so `data/mnist` is found from any folder of a source checkout); unchanged for 2-D data,
    /// an unset or rooted path, or a path found nowhere.
    /// </summary>
    public Recipe WithResolvedDataPath()
    {
        if (!IsImageData || string.IsNullOrWhiteSpace(DataPath) || Path.IsPathRooted(DataPath))
            return this;
        var candidates = new List<string> { Path.GetFullPath(DataPath) };
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            candidates.Add(Path.Combine(dir.FullName, DataPath));
        var found = candidates.FirstOrDefault(Directory.Exists);
        return found is null ? this : this with { DataPath = found };
    }

    /// <summary>The optimizer fields, as <see cref="AdamOptimizer"/> takes them.</summary>
    public AdamOptions ToAdamOptions() => new(LearningRate, AdamBeta1, AdamBeta2, AdamEpsilon, WeightDecay, GradClip, WarmupSteps,
        LearningRateDecay, MinLearningRate, Steps);

    private static object? ParseValue(Type type, string value)
    {
        var inv = CultureInfo.InvariantCulture;
        if (type == typeof(string)) return value;
        if (type == typeof(int)) return int.Parse(value, NumberStyles.Integer, inv);
        if (type == typeof(long)) return long.Parse(value, NumberStyles.Integer, inv);
        if (type == typeof(double)) return double.Parse(value, NumberStyles.Float, inv);
        if (type == typeof(bool)) return bool.Parse(value);
        if (type == typeof(int[]))
            return value.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)
                .Select(s => int.Parse(s, NumberStyles.Integer, inv)).ToArray();
        if (type.IsEnum)
        {
            var wanted = Normalize(value);
            foreach (var name in Enum.GetNames(type))
                if (Normalize(name) == wanted) return Enum.Parse(type, name);
            throw new FormatException($"'{value}' is not one of {string.Join(", ", Enum.GetNames(type).Select(Naming.Kebab))}");
        }
        if (Nullable.GetUnderlyingType(type) is { } inner)
            return value.Length == 0 ? null : ParseValue(inner, value);
        throw new ArgumentException($"unsupported field type {type.Name}");
    }

    private static string Describe(Type type) =>
        type == typeof(int) || type == typeof(long) ? "an integer"
        : type == typeof(double) ? "a number"
        : type == typeof(bool) ? "true or false"
        : type == typeof(int[]) ? "a comma-separated list of integers"
        : type.IsEnum ? "one of " + string.Join(", ", Enum.GetNames(type).Select(Naming.Kebab))
        : "text";

    internal static string Normalize(string s) => s.Replace("-", "", StringComparison.Ordinal).Replace("_", "", StringComparison.Ordinal).ToLowerInvariant();

    public bool Equals(Recipe? other) => other is not null && ToJson() == other.ToJson();
    public override int GetHashCode() => ToJson().GetHashCode(StringComparison.Ordinal);
}
