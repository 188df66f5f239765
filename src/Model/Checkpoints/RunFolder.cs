using System.Globalization;
using System.Text.Json;
using DistDiffusion.Model.Configuration;

namespace DistDiffusion.Model.Checkpoints;

/// <summary>What a verb was asked to open: the run flags `train`, `serve` and `run` share.</summary>
public sealed record RunRequest
{
    /// <summary>--resume: a run folder (its newest readable checkpoint) or one checkpoint folder.</summary>
    public string? Resume { get; init; }
    /// <summary>--out: the run folder of a new run, or where a resumed run branches off to.</summary>
    public string? Out { get; init; }
    /// <summary>--recipe: the recipe of a new run; on resume it must name the run's own recipe.</summary>
    public string? Recipe { get; init; }
    /// <summary>--set key=value: overrides of a new run; on resume they must not change the run's recipe.</summary>
    public IReadOnlyList<string> Set { get; init; } = [];
    /// <summary>--seed: the seed of a new run; on resume it must be the run's seed.</summary>
    public long? Seed { get; init; }
    /// <summary>--steps: the step to train to (the one thing a resumed run may change).</summary>
    public int? Steps { get; init; }
}

/// <summary>A checkpoint passed over at start-up because it cannot be read, and why.</summary>
public sealed record SkippedCheckpoint(string Folder, string Reason);

/// <summary>
/// The one way every training verb opens a run folder. A new run needs --recipe and --out (a folder without checkpoints).
/// --resume DIR continues the newest checkpoint of a run folder that can be read (newer ones that cannot are skipped and
/// reported, so a damaged latest checkpoint does not stop a restart), or one checkpoint folder given by its path (refused
/// when its run has newer checkpoints, unless --out branches off into a new folder). With --recipe, a run folder that has
/// no checkpoint yet starts the run there: the same arguments serve a Kubernetes coordinator's first start and every
/// restart. On resume, --recipe, --set and --seed may only restate the run's own recipe: anything they would change is
/// refused with the fields and values, since the run continues with the recipe stored in its checkpoint; --steps may change.
/// Usage errors are <see cref="ArgumentException"/>s; a checkpoint that cannot be read is a <see cref="CheckpointException"/>.
/// </summary>
public sealed class RunFolder : IDisposable
{
    private RunFolder(string runDir, Recipe recipe, CheckpointData? checkpoint, string? checkpointFolder, IReadOnlyList<SkippedCheckpoint> skipped)
    {
        RunDir = runDir;
        Recipe = recipe;
        Checkpoint = checkpoint;
        CheckpointFolder = checkpointFolder;
        Skipped = skipped;
    }

    /// <summary>The run folder (full path): checkpoints go to RunDir/checkpoints/&lt;step&gt;/.</summary>
    public string RunDir { get; }

    /// <summary>The recipe to train with, validated, its Steps the target step.</summary>
    public Recipe Recipe { get; }

    /// <summary>The checkpoint to continue (CPU tensors, released by <see cref="Dispose"/>); null for a new run.</summary>
    public CheckpointData? Checkpoint { get; }

    /// <summary>The folder <see cref="Checkpoint"/> was read from.</summary>
    public string? CheckpointFolder { get; }

    /// <summary>Newer checkpoints of the run that could not be read, newest first.</summary>
    public IReadOnlyList<SkippedCheckpoint> Skipped { get; }

    /// <summary>The checkpoint continued from, when it belongs to <see cref="RunDir"/> (not when branching off another run).</summary>
    public (string Folder, long Step)? LastCheckpointInRun =>
        CheckpointFolder is not null && Checkpoint is not null && SameFolder(RunOf(CheckpointFolder), RunDir) ? (CheckpointFolder, Checkpoint.Step) : null;

    public static RunFolder Open(RunRequest request)
    {
        ArgumentNullException.ThrowIfNull(request);
        if (request.Steps is < 0)
            throw new ArgumentException($"--steps {request.Steps}: expected a count >= 0");
        if (request.Resume is null)
        {
            if (request.Recipe is null) throw new ArgumentException("--recipe NAME is required for a new run (or --resume DIR to continue one)");
            if (request.Out is null) throw new ArgumentException("--out DIR is required for a new run (or --resume DIR to continue one)");
            return NewRun(request, request.Out);
        }

        var resume = Path.GetFullPath(request.Resume);
        string? explicitFolder = null;
        if (File.Exists(resume) && Path.GetFileName(resume) == CheckpointStore.ManifestFileName)
            explicitFolder = Path.GetDirectoryName(resume)!;
        else if (Directory.Exists(resume) && File.Exists(Path.Combine(resume, CheckpointStore.ManifestFileName)))
            explicitFolder = resume;

        CheckpointData checkpoint;
        string folder;
        var skipped = new List<SkippedCheckpoint>();
        if (explicitFolder is not null)
        {
            // One checkpoint asked for by its path: it must be readable, and continuing it in its own run must not
            // collide with the steps already saved after it.
            if (request.Out is null && Path.GetFileName(Path.GetDirectoryName(explicitFolder)) != CheckpointStore.CheckpointsFolderName)
                throw new ArgumentException($"--resume {request.Resume}: a checkpoint folder outside a run's {CheckpointStore.CheckpointsFolderName}/ folder; give --out DIR for the run to continue in");
            checkpoint = CheckpointStore.Load(explicitFolder);
            folder = explicitFolder;
            var source = RunOf(folder);
            if (request.Out is null || SameFolder(Path.GetFullPath(request.Out), source))
            {
                var later = CheckpointStore.List(source).Where(c => c.Step > checkpoint.Step).Select(c => c.Step).ToList();
                if (later.Count > 0)
                {
                    checkpoint.DisposeTensors();
                    throw new ArgumentException($"--resume {request.Resume}: step {checkpoint.Step} is not the latest checkpoint of {source} (it has {string.Join(", ", later)}); resume the run folder itself, or branch off with --out NEW_DIR");
                }
            }
        }
        else
        {
            if (!Directory.Exists(resume) || CheckpointStore.List(resume).Count == 0)
            {
                // Nothing to continue yet: with a recipe this is the run's first start.
                if (request.Recipe is null)
                    throw new ArgumentException($"--resume {request.Resume}: no checkpoint there yet{(Directory.Exists(resume) ? "" : " (no such folder)")}; give --recipe NAME to start the run in that folder");
                return NewRun(request, request.Out ?? request.Resume);
            }
            (checkpoint, folder) = LoadNewestReadable(resume, skipped);
        }

        try
        {
            var recipe = ResumedRecipe(request, checkpoint, folder);
            var runDir = Path.GetFullPath(request.Out ?? RunOf(folder));
            if (request.Out is not null && !SameFolder(runDir, RunOf(folder)) && HoldsCheckpoints(runDir))
                throw new ArgumentException($"--out {request.Out}: already holds a run with checkpoints; branch off into an empty folder (or resume that run itself)");
            return new RunFolder(runDir, recipe, checkpoint, folder, skipped);
        }
        catch
        {
            checkpoint.DisposeTensors();
            throw;
        }
    }

    /// <summary>
    /// The newest checkpoint of <paramref name="path"/> (a run folder, or a checkpoint folder: then that one) that can be
    /// read, with the newer ones that could not and why. Throws <see cref="CheckpointException"/> listing every reason
    /// when none can be read.
    /// </summary>
    public static (CheckpointData Checkpoint, string Folder, IReadOnlyList<SkippedCheckpoint> Skipped) LoadNewestReadable(string path)
    {
        var full = Path.GetFullPath(path);
        if (File.Exists(Path.Combine(full, CheckpointStore.ManifestFileName)) || File.Exists(full))
        {
            var folder = CheckpointStore.ResolveCheckpointFolder(full);
            return (CheckpointStore.Load(folder), folder, []);
        }
        if (Directory.Exists(full) && CheckpointStore.List(full).Count == 0)
            CheckpointStore.ResolveCheckpointFolder(full);   // throws, saying what the folder lacks
        var skipped = new List<SkippedCheckpoint>();
        var (checkpoint, found) = LoadNewestReadable(full, skipped);
        return (checkpoint, found, skipped);
    }

    private static (CheckpointData, string) LoadNewestReadable(string runDir, List<SkippedCheckpoint> skipped)
    {
        var all = CheckpointStore.List(runDir);
        if (all.Count == 0)
            throw new CheckpointException(runDir, "run folder has no complete checkpoint", null);
        for (var i = all.Count - 1; i >= 0; i--)
        {
            try
            {
                return (CheckpointStore.Load(all[i].Folder), all[i].Folder);
            }
            catch (CheckpointException e)
            {
                skipped.Add(new SkippedCheckpoint(all[i].Folder, e.Message));
            }
        }
        throw new CheckpointException(runDir, $"none of its {all.Count} checkpoints can be read: "
            + string.Join("; ", skipped.Select(s => s.Reason)) + "; repair or move them away, or start a new run in another folder", null);
    }

    private static RunFolder NewRun(RunRequest request, string outDir)
    {
        var recipe = Recipes.Get(request.Recipe!).WithOverrides(request.Set);
        if (request.Seed is { } seed) recipe = recipe with { Seed = seed };
        if (request.Steps is { } steps) recipe = recipe with { Steps = steps };
        recipe.Validate();
        var runDir = Path.GetFullPath(outDir);
        if (HoldsCheckpoints(runDir))
            throw new ArgumentException($"--out {outDir}: already holds a run with checkpoints; use --resume {outDir} to continue it or choose another folder");
        return new RunFolder(runDir, recipe, null, null, []);
    }

    /// <summary>The checkpoint's recipe, after checking that --recipe, --set and --seed only restate it; --set steps=N and --steps set the target.</summary>
    private static Recipe ResumedRecipe(RunRequest request, CheckpointData checkpoint, string folder)
    {
        var stored = checkpoint.Recipe;
        const string keeps = "a resumed run keeps the recipe stored in its checkpoint (only --steps may change; to change anything else start a new run in another folder)";
        if (request.Recipe is not null && RecipeFile.IsFileName(request.Recipe))
        {
            // A recipe file restates the run's recipe when it gives the same fields (bar the steps and the seed, checked apart).
            var given = Recipes.Get(request.Recipe);
            var changed = Differences(stored, given with { Steps = stored.Steps, Seed = request.Seed ?? given.Seed });
            if (changed.Count > 0)
                throw new ArgumentException($"--recipe {request.Recipe}: would change {string.Join(", ", changed)} of the run in {folder}; {keeps}");
        }
        else if (request.Recipe is not null && request.Recipe != stored.Name)
            throw new ArgumentException($"--recipe {request.Recipe}: {folder} is a checkpoint of recipe {stored.Name}; {keeps}");
        if (request.Seed is { } seed && seed != stored.Seed)
            throw new ArgumentException($"--seed {seed.ToString(CultureInfo.InvariantCulture)}: {folder} is a checkpoint of a run with seed {stored.Seed.ToString(CultureInfo.InvariantCulture)}; {keeps}");
        var wanted = stored.WithOverrides(request.Set);
        var changes = Differences(stored, wanted with { Steps = stored.Steps });
        if (changes.Count > 0)
            throw new ArgumentException($"--set {string.Join(" --set ", request.Set)}: would change {string.Join(", ", changes)} of the run in {folder}; {keeps}");
        var recipe = stored with { Steps = request.Steps ?? wanted.Steps };
        recipe.Validate();
        return recipe;
    }

    /// <summary>"field from A to B" for each recipe field that differs.</summary>
    private static List<string> Differences(Recipe a, Recipe b)
    {
        using var left = JsonDocument.Parse(a.ToJson());
        using var right = JsonDocument.Parse(b.ToJson());
        var changes = new List<string>();
        foreach (var p in left.RootElement.EnumerateObject())
        {
            var before = JsonSerializer.Serialize(p.Value);
            var after = right.RootElement.TryGetProperty(p.Name, out var v) ? JsonSerializer.Serialize(v) : "null";
            if (before != after)
                changes.Add($"{Naming.Kebab(p.Name)} from {before} to {after}");
        }
        return changes;
    }

    /// <summary>RUN for RUN/checkpoints/&lt;step&gt;.</summary>
    private static string RunOf(string checkpointFolder) => Path.GetFullPath(Path.Combine(checkpointFolder, "..", ".."));

    private static bool HoldsCheckpoints(string runDir) => CheckpointStore.List(runDir).Count > 0;

    private static bool SameFolder(string a, string b) =>
        string.Equals(Path.TrimEndingDirectorySeparator(Path.GetFullPath(a)), Path.TrimEndingDirectorySeparator(Path.GetFullPath(b)), StringComparison.Ordinal);

    private bool _disposed;

    /// <summary>Releases the checkpoint's CPU tensors (once their values are copied into a training state).</summary>
    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        Checkpoint?.DisposeTensors();
    }
}
