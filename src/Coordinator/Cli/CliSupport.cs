using System.CommandLine;
using System.Globalization;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Sampling;
using DistDiffusion.Model.Training;
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

    public static Option<int> ThreadsOption() => new("--threads")
    {
        Description = "CPU threads for torch (0: all cores)",
        DefaultValueFactory = _ => 0,
    };

    public static Device ResolveDevice(string spec, int threads)
    {
        if (threads < 0) throw new UsageException($"--threads {threads}: expected 0 (all cores) or a positive count");
        if (threads > 0) torch.set_num_threads(threads);
        var s = spec.Trim().ToLowerInvariant();
        if (s == "auto") return cuda.is_available() ? CUDA : CPU;
        if (s == "cpu") return CPU;
        if (s.StartsWith("cuda", StringComparison.Ordinal))
        {
            if (!cuda.is_available())
                throw new UsageException($"--device {spec}: CUDA is not available in this build or on this machine (use cpu or auto)");
            return new Device(s);
        }
        throw new UsageException($"--device {spec}: expected auto, cpu, cuda or cuda:N");
    }

    /// <summary>
    /// A recipe's relative data path resolved against the working directory, then against the folders above
    /// the executable (so `data/mnist` is found from any folder of a source checkout).
    /// </summary>
    public static Recipe ResolveDataPath(Recipe recipe)
    {
        if (!recipe.IsImageData || string.IsNullOrWhiteSpace(recipe.DataPath) || Path.IsPathRooted(recipe.DataPath))
            return recipe;
        var candidates = new List<string> { Path.GetFullPath(recipe.DataPath) };
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            candidates.Add(Path.Combine(dir.FullName, recipe.DataPath));
        var found = candidates.FirstOrDefault(Directory.Exists);
        return found is null ? recipe : recipe with { DataPath = found };
    }

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
    /// A model from a checkpoint folder (EMA weights unless <paramref name="rawWeights"/>); the checkpoint's CPU
    /// tensors are released once copied. <paramref name="adjust"/> may rewrite the stored recipe (e.g. resolve its data path).
    /// </summary>
    public static (DiffusionModel Model, CheckpointData Checkpoint) LoadModel(string checkpointPath, bool rawWeights, Device device, Func<Recipe, Recipe>? adjust = null)
    {
        var data = CheckpointStore.Load(checkpointPath);
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
        catch (Exception e)
        {
            // Anything else (a corrupt checkpoint, missing data, a native torch error) is a failure, not a usage error.
            Console.Error.WriteLine($"error: {e.Message.ReplaceLineEndings(" ")}");
            return ExitFailure;
        }
    }
}
