using System.CommandLine;
using System.Globalization;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Sampling;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>A wrong flag or value: printed as one line, exit code 2.</summary>
public sealed class UsageException(string message) : Exception(message);

/// <summary>Options and helpers shared by the verbs.</summary>
internal static class CliSupport
{
    public const int ExitOk = 0;
    public const int ExitFailure = 1;
    public const int ExitUsage = 2;

    public static Option<string> DeviceOption() => new("--device")
    {
        Description = "Device: auto (CUDA when available, else CPU), cpu, cuda or cuda:N",
        DefaultValueFactory = _ => "auto",
    };

    /// <summary>Class-conditional models: `--class N` samples only digit/class N (default: the classes in turn).</summary>
    public static Option<int?> ClassOption() => new("--class")
    {
        Description = "Class-conditional recipes: draw every sample of this class (0..classes-1); default: sample i is class i mod classes",
    };

    /// <summary>Class-conditional models: `--guidance S`, the classifier-free guidance scale (default: the recipe's).</summary>
    public static Option<double?> GuidanceOption() => new("--guidance")
    {
        Description = "Class-conditional recipes: classifier-free guidance scale s >= 0 (1: the conditional model alone, 0: the unconditional one); default: the recipe's guidance",
    };

    /// <summary>The request's class and guidance from <see cref="ClassOption"/> and <see cref="GuidanceOption"/>.</summary>
    public static Model.Sampling.ClassGuidance Conditioning(System.CommandLine.ParseResult p, Option<int?> classOption, Option<double?> guidance) =>
        new(p.GetValue(classOption), p.GetValue(guidance));

    /// <summary>Copies a conditioning into a request's optional class_label and guidance fields.</summary>
    public static void Apply(Model.Sampling.ClassGuidance c, Action<int> setClass, Action<double> setGuidance)
    {
        if (c.Class is { } k) setClass(k);
        if (c.Guidance is { } g) setGuidance(g);
    }

    /// <summary>What --recipe takes, wherever it is taken: a built-in name or a recipe file.</summary>
    public static string RecipeDescription { get; } =
        $"A built-in recipe ({string.Join(", ", Recipes.All.Select(r => r.Name))}; `coordinator recipes` lists them) or a recipe file NAME.json (`coordinator recipes --show NAME` prints one to start from)";

    public static Option<int> ThreadsOption() => new("--threads")
    {
        Description = "CPU threads for torch (0: all cores)",
        DefaultValueFactory = _ => 0,
    };

    public static Option<int?> KeepCheckpointsOption() => new("--keep-checkpoints")
    {
        Description = $"Keep the newest N checkpoints; older ones are deleted once a new one is written and verified (default {CheckpointRetention.DefaultKeepLast})",
    };

    public static Option<int?> KeepEveryOption() => new("--keep-every")
    {
        Description = "Also keep for good every checkpoint whose step is a multiple of K (default: none)",
    };

    public static Option<int> LogEveryOption() => new("--log-every")
    {
        Description = "Every N steps: a line in OUT/metrics.jsonl (and the loss in the log at Information)",
        DefaultValueFactory = _ => 100,
    };

    /// <summary>The token a client verb (status, sample) presents.</summary>
    public static Option<string?> TokenFileOption() => new("--token-file")
    {
        Description = $"File holding the client token, or the shared one (default: the {DistDiffusion.Protocol.Names.ClientTokenEnvironmentVariable} environment variable, else {DistDiffusion.Protocol.Names.TokenEnvironmentVariable})",
    };

    public static Option<string> AddressOption() => new("--address")
    {
        Description = "The coordinator's URL",
        DefaultValueFactory = _ => DistDiffusion.Protocol.Names.DefaultAddress,
    };

    /// <summary>One line for a failed call: unreachable, refused token, or the server's status.</summary>
    public static string DescribeRpcFailure(Grpc.Core.RpcException e, Uri address) => e.StatusCode switch
    {
        Grpc.Core.StatusCode.Unavailable => $"error: cannot reach the coordinator at {address}: {e.Status.Detail} (is `coordinator serve` running there?)",
        Grpc.Core.StatusCode.DeadlineExceeded => $"error: the coordinator at {address} did not answer in time",
        Grpc.Core.StatusCode.Unauthenticated => $"error: the coordinator at {address} refused the token: {e.Status.Detail}",
        Grpc.Core.StatusCode.PermissionDenied => $"error: the coordinator at {address} refused this token's role: {e.Status.Detail}",
        _ => $"error: {e.StatusCode}: {e.Status.Detail}",
    };

    public static Serilog.Events.LogEventLevel ParseLogLevel(string text) => text.ToLowerInvariant() switch
    {
        "debug" => Serilog.Events.LogEventLevel.Debug,
        "information" or "info" => Serilog.Events.LogEventLevel.Information,
        "warning" => Serilog.Events.LogEventLevel.Warning,
        "error" => Serilog.Events.LogEventLevel.Error,
        _ => throw new ArgumentException($"--log-level {text}: expected debug, information, warning or error"),
    };

    public static Device ResolveDevice(string spec, int threads) => UserInput(() => DistDiffusion.Model.TorchRuntime.ResolveDevice(spec, threads));

    /// <summary>Runs <paramref name="build"/>, turning its <see cref="ArgumentException"/> (a bad recipe field, name or request value the user typed) into a usage error.</summary>
    public static T UserInput<T>(Func<T> build)
    {
        try
        {
            return build();
        }
        catch (ArgumentException e)
        {
            throw new UsageException(e.Message);
        }
    }

    /// <summary>
    /// A model from a checkpoint folder, or from the newest readable checkpoint of a run folder (EMA weights unless
    /// <paramref name="rawWeights"/>): newer checkpoints that cannot be read are skipped with a warning on stderr, as
    /// `train`, `serve` and `run` skip them (<see cref="RunFolder.LoadNewestReadable(string)"/>). The checkpoint's CPU
    /// tensors are released once copied. <paramref name="adjust"/> may rewrite the stored recipe (e.g. resolve its data path).
    /// </summary>
    public static (DiffusionModel Model, CheckpointData Checkpoint) LoadModel(string checkpointPath, bool rawWeights, Device device, Func<Recipe, Recipe>? adjust = null)
    {
        var (data, folder, skipped) = RunFolder.LoadNewestReadable(checkpointPath);
        WarnSkipped(skipped, folder);
        if (adjust is not null) data = data with { Recipe = adjust(data.Recipe) };
        try
        {
            return (DiffusionModel.FromCheckpoint(data, useEma: !rawWeights, device), data);
        }
        finally
        {
            data.DisposeTensors();
        }
    }

    /// <summary>One warning line per checkpoint passed over, and which one is used instead (when any was).</summary>
    public static void WarnSkipped(IReadOnlyList<SkippedCheckpoint> skipped, string? used = null)
    {
        foreach (var s in skipped)
            Console.Error.WriteLine($"warning: checkpoint {s.Folder} cannot be read, skipped: {s.Reason.ReplaceLineEndings(" ")}");
        if (skipped.Count > 0 && used is not null) Console.Error.WriteLine($"using the newest readable checkpoint instead: {used}");
    }

    public static string Format(double v) => v.ToString("G4", CultureInfo.InvariantCulture);

    /// <summary>Parses, runs the chosen verb and maps failures to exit codes: 2 for usage, 1 for everything else.</summary>
    public static int Invoke(RootCommand root, string[] args)
    {
        var parsed = root.Parse(args);
        if (parsed.Errors.Count > 0)
        {
            Console.Error.WriteLine($"error: {parsed.Errors[0].Message} (see --help)");
            return ExitUsage;
        }
        try
        {
            return parsed.Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
        }
        catch (UsageException e)
        {
            Console.Error.WriteLine($"error: {e.Message}");
            return ExitUsage;
        }
        catch (OperationCanceledException)
        {
            Console.Error.WriteLine("cancelled");
            return 130;
        }
#pragma warning disable CA1031 // the CLI's last resort: any failure becomes an exit code and one line on stderr
        catch (Exception e)
#pragma warning restore CA1031
        {
            // Anything else (a corrupt checkpoint, missing data, a native torch error) is a failure, not a usage error.
            Console.Error.WriteLine($"error: {e.Message.ReplaceLineEndings(" ")}");
            return ExitFailure;
        }
    }

    /// <summary>The middle value (the mean of the two middle ones for an even count).</summary>
    public static double Median(IEnumerable<double> values)
    {
        var sorted = values.Order().ToList();
        return sorted.Count % 2 == 1 ? sorted[sorted.Count / 2] : (sorted[sorted.Count / 2 - 1] + sorted[sorted.Count / 2]) / 2;
    }
}
