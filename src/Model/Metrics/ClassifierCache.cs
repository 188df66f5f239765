using System.Diagnostics;
using System.Security.Cryptography;
using System.Text.Json;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Metrics;

/// <summary>What a cached classifier was trained on and how well it does: <c>classifier.json</c> next to its weights.</summary>
public sealed record ClassifierInfo
{
    public required int FormatVersion { get; init; }
    public required ClassifierConfig Config { get; init; }
    /// <summary>SHA-256 over the names and bytes of the data set's IDX files.</summary>
    public required string DataHash { get; init; }
    /// <summary>The train / held-out split the classifier was trained on (the recipe's held-out fraction and seed).</summary>
    public required double HeldOutFraction { get; init; }
    public required long SplitSeed { get; init; }
    public required long[] ImageShape { get; init; }
    public required int Classes { get; init; }
    public required long TrainImages { get; init; }
    public required long HeldOutImages { get; init; }
    /// <summary>Share of the held-out split labelled correctly.</summary>
    public required double HeldOutAccuracy { get; init; }
    public required double TrainSeconds { get; init; }
    /// <summary>SHA-256 of <c>classifier.safetensors</c>.</summary>
    public required string WeightsSha256 { get; init; }
}

/// <summary>A classifier ready for evaluation, and where it came from.</summary>
public sealed class CachedClassifier(DigitClassifier network, ClassifierInfo info, bool trained, string? whyTrained, string? notCached) : IDisposable
{
    public DigitClassifier Network { get; } = network;
    public ClassifierInfo Info { get; } = info;
    /// <summary>Trained now (true) or loaded from the cache (false).</summary>
    public bool Trained { get; } = trained;
    /// <summary>Why the cache was not used: missing, stale (what changed) or corrupt (what is wrong); null when loaded.</summary>
    public string? WhyTrained { get; } = whyTrained;
    /// <summary>Why a freshly trained classifier could not be written to the cache (e.g. a read-only data folder); null if it was.</summary>
    public string? NotCached { get; } = notCached;

    public void Dispose() => Network.Dispose();
}

/// <summary>
/// The evaluation classifier of a labelled image data set, cached in <c>&lt;data dir&gt;/classifier/</c>
/// (<c>classifier.safetensors</c> + <c>classifier.json</c>). A cache is used only when its format, config, data hash
/// and split match and its weights' checksum, tensor names and shapes check out; otherwise it is retrained and rewritten
/// (weights first, the JSON last, each through a temporary file, so an interrupted write leaves no loadable cache).
/// </summary>
public static class ClassifierCache
{
    public const int FormatVersion = 1;
    public const string FolderName = "classifier";
    public const string WeightsFileName = "classifier.safetensors";
    public const string InfoFileName = "classifier.json";

    public static string Folder(string dataDir) => Path.Combine(dataDir, FolderName);

    /// <summary>The cached classifier if it is valid for this data, split and config; else one trained on <paramref name="train"/> and cached.</summary>
    /// <param name="onProgress">messages about training (why, each epoch's loss), for the user.</param>
    public static CachedClassifier LoadOrTrain(string dataDir, Dataset train, Dataset heldOut, double heldOutFraction, long splitSeed,
        ClassifierConfig? config = null, bool retrain = false, Action<string>? onProgress = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(dataDir);
        ArgumentNullException.ThrowIfNull(train);
        ArgumentNullException.ThrowIfNull(heldOut);
        config ??= ClassifierConfig.Default;
        config.Validate();
        if (heldOut.Labels is null)
            throw new ArgumentException($"dataset '{heldOut.Description}' has no labels: the classifier's accuracy cannot be measured", nameof(heldOut));
        var dataHash = DataHash(dataDir);
        string why;
        if (retrain)
            why = "retraining was asked for";
        else
        {
            var (loaded, problem) = TryLoad(dataDir, dataHash, heldOutFraction, splitSeed, train.SampleShape, config);
            if (loaded is not null) return loaded;
            why = problem!;
        }
        onProgress?.Invoke($"training the evaluation classifier for {dataDir} ({why}): {(config.TrainLimit > 0 ? Math.Min(config.TrainLimit, train.Count) : train.Count)} images, {config.Epochs} epochs");
        var watch = Stopwatch.StartNew();
        var network = DigitClassifier.Train(train, config, (epoch, loss) =>
            onProgress?.Invoke(string.Create(System.Globalization.CultureInfo.InvariantCulture, $"classifier epoch {epoch}/{config.Epochs}: loss {loss:F4} ({watch.Elapsed.TotalSeconds:F1} s)")));
        try
        {
            var seconds = watch.Elapsed.TotalSeconds;
            var accuracy = network.Accuracy(heldOut);
            var bytes = Serialize(network);
            var info = new ClassifierInfo
            {
                FormatVersion = FormatVersion,
                Config = config,
                DataHash = dataHash,
                HeldOutFraction = heldOutFraction,
                SplitSeed = splitSeed,
                ImageShape = train.SampleShape,
                Classes = network.Classes,
                TrainImages = config.TrainLimit > 0 ? Math.Min(config.TrainLimit, train.Count) : train.Count,
                HeldOutImages = heldOut.Count,
                HeldOutAccuracy = accuracy,
                TrainSeconds = Math.Round(seconds, 2),
                WeightsSha256 = Convert.ToHexStringLower(SHA256.HashData(bytes)),
            };
            string? notCached = null;
            try
            {
                Write(dataDir, bytes, info);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                notCached = $"{Folder(dataDir)} not written: {e.Message}";
            }
            return new CachedClassifier(network, info, trained: true, why, notCached);
        }
        catch
        {
            network.Dispose();
            throw;
        }
    }

    /// <summary>SHA-256 over the IDX files (<c>*-ubyte</c>, <c>*-ubyte.gz</c>) directly in <paramref name="dataDir"/>, by name and content.</summary>
    public static string DataHash(string dataDir)
    {
        if (!Directory.Exists(dataDir))
            throw new DirectoryNotFoundException($"data folder {dataDir} does not exist");
        var files = Directory.GetFiles(dataDir)
            .Where(f => f.EndsWith("-ubyte", StringComparison.Ordinal) || f.EndsWith("-ubyte.gz", StringComparison.Ordinal))
            .OrderBy(f => Path.GetFileName(f), StringComparer.Ordinal)
            .ToList();
        if (files.Count == 0)
            throw new FileNotFoundException($"data folder {dataDir} holds no IDX files (*-ubyte or *-ubyte.gz): the classifier is for MNIST-style labelled data", dataDir);
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        foreach (var file in files)
        {
            hash.AppendData(System.Text.Encoding.UTF8.GetBytes(Path.GetFileName(file) + "\n"));
            using var stream = File.OpenRead(file);
            var buffer = new byte[1 << 16];
            int read;
            while ((read = stream.Read(buffer)) > 0) hash.AppendData(buffer.AsSpan(0, read));
            hash.AppendData(BitConverter.GetBytes(stream.Length));
        }
        return Convert.ToHexStringLower(hash.GetHashAndReset());
    }

    /// <summary>The cached classifier, or null and why it cannot be used (missing, stale, corrupt). Never returns a half-loaded network.</summary>
    public static (CachedClassifier? Classifier, string? Problem) TryLoad(string dataDir, string dataHash, double heldOutFraction, long splitSeed, long[] imageShape, ClassifierConfig config)
    {
        var infoPath = Path.Combine(Folder(dataDir), InfoFileName);
        var weightsPath = Path.Combine(Folder(dataDir), WeightsFileName);
        if (!File.Exists(infoPath)) return (null, $"no cached classifier in {Folder(dataDir)}");
        ClassifierInfo? info;
        try
        {
            info = JsonSerializer.Deserialize<ClassifierInfo>(File.ReadAllText(infoPath), Recipe.JsonOptions);
        }
        catch (Exception e) when (e is JsonException or IOException or NotSupportedException)
        {
            return (null, $"corrupt cache: {infoPath} is not valid: {e.Message.ReplaceLineEndings(" ")}");
        }
        if (info is null || info.Config is null || info.ImageShape is null || info.DataHash is null || info.WeightsSha256 is null)
            return (null, $"corrupt cache: {infoPath} lacks fields");
        if (info.FormatVersion != FormatVersion) return (null, $"stale cache: format {info.FormatVersion}, expected {FormatVersion}");
        if (info.Config != config) return (null, $"stale cache: trained with {info.Config}, expected {config}");
        if (info.DataHash != dataHash) return (null, "stale cache: the data files changed since it was trained");
        if (info.HeldOutFraction != heldOutFraction || info.SplitSeed != splitSeed)
            return (null, $"stale cache: trained on the split (held-out fraction {info.HeldOutFraction}, seed {info.SplitSeed}), expected ({heldOutFraction}, {splitSeed})");
        if (!info.ImageShape.SequenceEqual(imageShape))
            return (null, $"stale cache: images [{string.Join(", ", info.ImageShape)}], expected [{string.Join(", ", imageShape)}]");
        if (!File.Exists(weightsPath)) return (null, $"corrupt cache: {weightsPath} is missing");
        byte[] bytes;
        try
        {
            bytes = File.ReadAllBytes(weightsPath);
        }
        catch (IOException e)
        {
            return (null, $"corrupt cache: {weightsPath} cannot be read: {e.Message}");
        }
        var sha = Convert.ToHexStringLower(SHA256.HashData(bytes));
        if (sha != info.WeightsSha256) return (null, $"corrupt cache: {weightsPath} checksum {sha[..12]}..., expected {info.WeightsSha256[..Math.Min(12, info.WeightsSha256.Length)]}...");

        Dictionary<string, Tensor> tensors;
        try
        {
            (tensors, _) = SafeTensorsFile.Deserialize(bytes, weightsPath);
        }
        catch (InvalidDataException e)
        {
            return (null, $"corrupt cache: {e.Message}");
        }
        DigitClassifier? network = null;
        try
        {
            network = new DigitClassifier(imageShape, info.Classes, config);
            var state = network.state_dict();
            var names = state.Keys.OrderBy(k => k, StringComparer.Ordinal).ToList();
            if (!names.SequenceEqual(tensors.Keys.OrderBy(k => k, StringComparer.Ordinal)))
                return (null, $"corrupt cache: {weightsPath} holds tensors [{string.Join(", ", tensors.Keys)}], expected [{string.Join(", ", names)}]");
            foreach (var (name, target) in state)
            {
                var source = tensors[name];
                if (!source.shape.SequenceEqual(target.shape) || source.dtype != target.dtype)
                    return (null, $"corrupt cache: {weightsPath} tensor {name} is {source.dtype} [{string.Join(", ", source.shape)}], expected {target.dtype} [{string.Join(", ", target.shape)}]");
            }
            using (no_grad())
                foreach (var (name, target) in state)
                    target.copy_(tensors[name]);
            network.eval();
            var loaded = new CachedClassifier(network, info, trained: false, null, null);
            network = null;
            return (loaded, null);
        }
        catch (ArgumentException e)
        {
            return (null, $"corrupt cache: {e.Message}");
        }
        finally
        {
            network?.Dispose();
            foreach (var t in tensors.Values) t.Dispose();
        }
    }

    private static byte[] Serialize(DigitClassifier network)
    {
        var state = network.state_dict().ToDictionary(kv => kv.Key, kv => kv.Value.detach().cpu());
        try
        {
            return SafeTensorsFile.Serialize(state);
        }
        finally
        {
            foreach (var t in state.Values) t.Dispose();
        }
    }

    private static void Write(string dataDir, byte[] weights, ClassifierInfo info)
    {
        var folder = Folder(dataDir);
        Directory.CreateDirectory(folder);
        var infoPath = Path.Combine(folder, InfoFileName);
        // The JSON is the commit mark: it goes first and comes back last.
        File.Delete(infoPath);
        WriteAtomically(Path.Combine(folder, WeightsFileName), weights);
        WriteAtomically(infoPath, System.Text.Encoding.UTF8.GetBytes(JsonSerializer.Serialize(info, Recipe.JsonOptions) + "\n"));
    }

    private static void WriteAtomically(string path, byte[] bytes)
    {
        var temp = $"{path}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp";
        try
        {
            using (var file = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None))
            {
                file.Write(bytes);
                file.Flush(flushToDisk: true);
            }
            File.Move(temp, path, overwrite: true);
        }
        finally
        {
            if (File.Exists(temp)) File.Delete(temp);
        }
    }
}
