using System.Globalization;
using System.Security.Cryptography;
using System.Text.Json;
using DistDiffusion.Model.Configuration;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Checkpoints;

/// <summary>
/// Checkpoints of a run, one folder per step: <c>RUN/checkpoints/&lt;step&gt;/</c> holding <c>model.safetensors</c>,
/// <c>ema.safetensors</c>, <c>optimizer.safetensors</c> and <c>checkpoint.json</c> (recipe, position, sizes and SHA-256
/// of the tensor files). A checkpoint is written into a temporary sibling folder and renamed into place, so a folder
/// named by a step is complete unless something else damaged it; a valid checkpoint is never overwritten.
/// </summary>
public static class CheckpointStore
{
    public const int FormatVersion = 1;

    public const string CheckpointsFolderName = "checkpoints";
    public const string ManifestFileName = "checkpoint.json";
    public const string ModelFileName = "model.safetensors";
    public const string EmaFileName = "ema.safetensors";
    public const string OptimizerFileName = "optimizer.safetensors";

    /// <summary>Checkpoint fact in 'extra': Adam's update count, which equals the checkpoint's step.</summary>
    public const string OptimizerStepKey = "optimizer.step";

    /// <summary>Checkpoint fact in 'extra': the training-set size the data order was planned for (the cursor stays below it).</summary>
    public const string TrainSizeKey = "data.train_size";

    private const string TempPrefix = ".tmp-";

    /// <summary>Prefix of a step folder moved out of the way because it was not a valid checkpoint (kept for inspection).</summary>
    public const string BrokenPrefix = ".broken-";

    /// <summary>Prefix of a checkpoint being deleted by retention (renamed first, so it never looks like a checkpoint).</summary>
    private const string DeletingPrefix = ".deleting-";

    /// <summary>Temporary folders older than this are taken to be leftovers of a crashed save and deleted by <see cref="Save"/>.</summary>
    private static readonly TimeSpan StaleTempAge = TimeSpan.FromHours(1);

    private static readonly string[] TensorFiles = [ModelFileName, EmaFileName, OptimizerFileName];

    /// <summary>Writes <c>runDir/checkpoints/&lt;step&gt;/</c> atomically and returns its path (see <see cref="Write"/>).</summary>
    /// <exception cref="IOException">a valid checkpoint for this step already exists, or the disk failed.</exception>
    public static string Save(string runDir, CheckpointData data) => Write(runDir, data).Folder;

    /// <summary>
    /// Writes <c>runDir/checkpoints/&lt;step&gt;/</c> atomically (a temporary sibling folder, flushed, then renamed), reads
    /// it back to verify every file's size and SHA-256, and only then, with a <paramref name="retention"/>, deletes the
    /// checkpoints it no longer keeps. A valid checkpoint of the same step is never overwritten (IOException); anything
    /// else in the way (an empty or partial folder, a corrupt checkpoint, a file) is moved aside to
    /// <c>.broken-&lt;step&gt;-&lt;time&gt;</c>, a name <see cref="List"/> ignores, and reported in the result.
    /// </summary>
    /// <exception cref="IOException">a valid checkpoint for this step already exists, or writing or verifying failed
    /// (then nothing was deleted, and no folder named by the step is left behind by this call).</exception>
    public static SavedCheckpoint Write(string runDir, CheckpointData data, CheckpointRetention? retention = null)
    {
        ArgumentNullException.ThrowIfNull(data);
        ArgumentNullException.ThrowIfNull(data.Recipe);
        ArgumentOutOfRangeException.ThrowIfNegative(data.Step);
        var checkpoints = Path.Combine(Path.GetFullPath(runDir), CheckpointsFolderName);
        var step = data.Step.ToString(CultureInfo.InvariantCulture);
        var final = Path.Combine(checkpoints, step);
        var setAside = new List<SetAsideFolder>();
        if (Directory.Exists(final) || File.Exists(final))
            setAside.Add(SetAsideUnlessValid(checkpoints, final, data.Step));
        Directory.CreateDirectory(checkpoints);
        DeleteStaleTempFolders(checkpoints);

        var temp = Path.Combine(checkpoints, $"{TempPrefix}{step}-{Guid.NewGuid():N}");
        Directory.CreateDirectory(temp);
        try
        {
            var files = new List<(string Name, long Bytes, string Sha256)>();
            foreach (var (name, tensors) in new[] { (ModelFileName, data.Model), (EmaFileName, data.Ema), (OptimizerFileName, data.Optimizer) })
            {
                var path = Path.Combine(temp, name);
                var metadata = new Dictionary<string, string>
                {
                    ["format"] = "pt",
                    ["content"] = Path.GetFileNameWithoutExtension(name),
                    ["step"] = step,
                };
                SafeTensorsFile.Write(path, tensors ?? throw new ArgumentException($"{name}: tensor dictionary is null"), metadata);
                var (bytes, sha) = Measure(path);
                files.Add((name, bytes, sha));
            }
            WriteManifest(Path.Combine(temp, ManifestFileName), data, files);

            if (Directory.Exists(final) || File.Exists(final))
                throw new IOException($"checkpoint {final} already exists; checkpoints are never overwritten");
            try
            {
                Directory.Move(temp, final); // refuses an existing target, even an empty one
            }
            catch (IOException e) when (Directory.Exists(final))
            {
                throw new IOException($"checkpoint {final} already exists (written concurrently); checkpoints are never overwritten", e);
            }
        }
        catch
        {
            TryDelete(temp);
            throw;
        }

        // Read back what the disk holds before anything older is given up.
        try
        {
            Verify(final);
        }
        catch (CheckpointException e)
        {
            var moved = MoveAside(checkpoints, final, data.Step);
            throw new CheckpointException(final, $"written but does not verify ({e.Message}); moved to {moved}", e);
        }
        var (deleted, problems) = retention is null ? ([], []) : Prune(runDir, retention, data.Step);
        return new SavedCheckpoint(final, data.Step, setAside, deleted, problems);
    }

    /// <summary>
    /// Checks a checkpoint folder without loading its tensors: the manifest (format and ranges) and every tensor file's
    /// size and SHA-256. Returns the step it holds; throws <see cref="CheckpointException"/> naming the problem.
    /// </summary>
    public static long Verify(string folder)
    {
        var manifestPath = Path.Combine(folder, ManifestFileName);
        var manifest = ReadManifest(manifestPath);
        foreach (var name in TensorFiles)
        {
            var (bytes, sha) = manifest.Files.TryGetValue(name, out var f)
                ? f
                : throw new CheckpointException(manifestPath, $"'files' does not list {name}", null);
            var path = Path.Combine(folder, name);
            if (!File.Exists(path))
                throw new CheckpointException(path, "missing file", null);
            var (actualBytes, actualSha) = Measure(path);
            if (actualBytes != bytes)
                throw new CheckpointException(path, actualBytes < bytes ? $"truncated: {actualBytes} bytes, expected {bytes}" : $"size mismatch: {actualBytes} bytes, expected {bytes}", null);
            if (actualSha != sha)
                throw new CheckpointException(path, $"checksum mismatch: expected {sha}, got {actualSha}", null);
        }
        return manifest.Step;
    }

    /// <summary>
    /// Deletes the checkpoints <paramref name="retention"/> does not keep: each is first renamed to <c>.deleting-...</c>
    /// (so no reader ever sees half a checkpoint under a step's name), then removed. The checkpoint of
    /// <paramref name="keepStep"/> (the one just written) is always kept. Problems are returned, not thrown: a checkpoint
    /// that could not be deleted costs space, not the run.
    /// </summary>
    public static (IReadOnlyList<string> Deleted, IReadOnlyList<string> Problems) Prune(string runDir, CheckpointRetention retention, long keepStep)
    {
        ArgumentNullException.ThrowIfNull(retention);
        var checkpoints = Path.Combine(Path.GetFullPath(runDir), CheckpointsFolderName);
        var deleted = new List<string>();
        var problems = new List<string>();
        var all = List(runDir);
        var newest = all.Skip(Math.Max(0, all.Count - retention.KeepLast)).Select(c => c.Step).ToHashSet();
        foreach (var (step, folder) in all)
        {
            if (step == keepStep || newest.Contains(step) || retention.KeepsForGood(step)) continue;
            var trash = Path.Combine(checkpoints, $"{DeletingPrefix}{step.ToString(CultureInfo.InvariantCulture)}-{Guid.NewGuid():N}");
            try
            {
                Directory.Move(folder, trash);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                problems.Add($"{folder}: {e.Message}");
                continue;
            }
            deleted.Add(folder);
        }
        // This call's trash, and any a crash left behind.
        if (Directory.Exists(checkpoints))
            foreach (var trash in Directory.EnumerateDirectories(checkpoints, DeletingPrefix + "*"))
            {
                try
                {
                    Directory.Delete(trash, recursive: true);
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                {
                    problems.Add($"{trash}: {e.Message}");
                }
            }
        return (deleted, problems);
    }

    /// <summary>A step's folder that is in the way of a save: refused when it is a valid checkpoint, else moved aside.</summary>
    private static SetAsideFolder SetAsideUnlessValid(string checkpoints, string final, long step)
    {
        string reason;
        if (File.Exists(final))
        {
            reason = "a file, not a checkpoint folder";
        }
        else
        {
            try
            {
                Verify(final);
                throw new IOException($"checkpoint {final} already exists; checkpoints are never overwritten");
            }
            catch (CheckpointException e)
            {
                reason = File.Exists(Path.Combine(final, ManifestFileName)) || e.FilePath != Path.Combine(final, ManifestFileName)
                    ? e.Message
                    : $"no {ManifestFileName} (an empty or partial step folder)";
            }
        }
        return new SetAsideFolder(final, MoveAside(checkpoints, final, step), reason);
    }

    /// <summary>Renames a step's folder (or file) to <c>.broken-&lt;step&gt;-&lt;UTC time&gt;</c>, which <see cref="List"/> ignores; returns the new path.</summary>
    private static string MoveAside(string checkpoints, string path, long step)
    {
        var target = Path.Combine(checkpoints, string.Create(CultureInfo.InvariantCulture, $"{BrokenPrefix}{step}-{DateTime.UtcNow:yyyyMMdd'T'HHmmss'Z'}"));
        if (Directory.Exists(target) || File.Exists(target)) target += "-" + Guid.NewGuid().ToString("N")[..8];
        if (File.Exists(path)) File.Move(path, target);
        else Directory.Move(path, target);
        return target;
    }

    /// <summary>
    /// Loads a checkpoint folder, or the latest complete checkpoint of a run folder, after checking every file's size
    /// and SHA-256. On any error throws <see cref="CheckpointException"/> and no tensors are handed out.
    /// </summary>
    public static CheckpointData Load(string path)
    {
        var folder = ResolveCheckpointFolder(path);
        var manifestPath = Path.Combine(folder, ManifestFileName);
        var manifest = ReadManifest(manifestPath);

        var loaded = new List<Dictionary<string, Tensor>>();
        try
        {
            foreach (var name in TensorFiles)
            {
                var (bytes, sha) = manifest.Files.TryGetValue(name, out var f)
                    ? f
                    : throw new CheckpointException(manifestPath, $"'files' does not list {name}", null);
                loaded.Add(ReadVerified(Path.Combine(folder, name), bytes, sha));
            }
        }
        catch
        {
            foreach (var d in loaded) SafeTensorsFile.DisposeAll(d.Values);
            throw;
        }
        return new CheckpointData(manifest.Recipe, manifest.Step, manifest.Epoch, manifest.Cursor, manifest.Seed,
            loaded[0], loaded[1], loaded[2], manifest.Extra);
    }

    /// <summary>The checkpoint folder <see cref="Load"/> would read for <paramref name="path"/>.</summary>
    public static string ResolveCheckpointFolder(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        var full = Path.GetFullPath(path);
        if (File.Exists(full) && Path.GetFileName(full) == ManifestFileName)
            return Path.GetDirectoryName(full)!;
        if (!Directory.Exists(full))
            throw new CheckpointException(full, "no such checkpoint or run folder", null);
        if (File.Exists(Path.Combine(full, ManifestFileName)))
            return full;
        var checkpoints = Path.Combine(full, CheckpointsFolderName);
        if (Directory.Exists(checkpoints))
        {
            var all = List(full);
            return all.Count > 0
                ? all[^1].Folder
                : throw new CheckpointException(full, $"run folder has no complete checkpoint (nothing usable in {checkpoints})", null);
        }
        throw new CheckpointException(full, $"neither a checkpoint folder (no {ManifestFileName}) nor a run folder (no {CheckpointsFolderName}/)", null);
    }

    /// <summary>Complete checkpoints of a run (folders named by a step holding checkpoint.json), by ascending step.</summary>
    public static IReadOnlyList<(long Step, string Folder)> List(string runDir)
    {
        var checkpoints = Path.Combine(Path.GetFullPath(runDir), CheckpointsFolderName);
        if (!Directory.Exists(checkpoints))
            return [];
        var found = new List<(long Step, string Folder)>();
        foreach (var dir in Directory.EnumerateDirectories(checkpoints))
        {
            var name = Path.GetFileName(dir);
            if (name.Length == 0 || !name.All(char.IsAsciiDigit)
                || !long.TryParse(name, NumberStyles.None, CultureInfo.InvariantCulture, out var step))
                continue;
            if (File.Exists(Path.Combine(dir, ManifestFileName)))
                found.Add((step, dir));
        }
        found.Sort((a, b) => a.Step.CompareTo(b.Step));
        return found;
    }

    // ---------------------------------------------------------------- manifest

    private sealed record Manifest(
        Recipe Recipe, long Step, long Epoch, long Cursor, long Seed,
        Dictionary<string, string> Extra, Dictionary<string, (long Bytes, string Sha256)> Files);

    private static void WriteManifest(string path, CheckpointData data, List<(string Name, long Bytes, string Sha256)> files)
    {
        using var file = new FileStream(path, FileMode.CreateNew, FileAccess.Write, FileShare.None);
        using (var json = new Utf8JsonWriter(file, new JsonWriterOptions { Indented = true }))
        {
            json.WriteStartObject();
            json.WriteNumber("format_version", FormatVersion);
            json.WritePropertyName("recipe");
            json.WriteRawValue(data.Recipe.ToJson());
            json.WriteNumber("step", data.Step);
            json.WriteNumber("epoch", data.Epoch);
            json.WriteNumber("cursor", data.Cursor);
            json.WriteNumber("seed", data.Seed);
            json.WriteString("created_utc", DateTime.UtcNow.ToString("O", CultureInfo.InvariantCulture));
            json.WriteStartObject("extra");
            foreach (var (k, v) in (data.Extra ?? new Dictionary<string, string>()).OrderBy(kv => kv.Key, StringComparer.Ordinal))
                json.WriteString(k, v ?? throw new ArgumentException($"extra value for '{k}' is null"));
            json.WriteEndObject();
            json.WriteStartObject("files");
            foreach (var (name, bytes, sha) in files)
            {
                json.WriteStartObject(name);
                json.WriteNumber("bytes", bytes);
                json.WriteString("sha256", sha);
                json.WriteEndObject();
            }
            json.WriteEndObject();
            json.WriteEndObject();
        }
        file.Flush(flushToDisk: true);
    }

    private static Manifest ReadManifest(string path)
    {
        if (!File.Exists(path))
            throw new CheckpointException(path, "missing file", null);
        var text = File.ReadAllBytes(path);
        // JsonDocument checks a string's UTF-8 only when it is read (an InvalidOperationException then): check it all first.
        if (!System.Text.Unicode.Utf8.IsValid(text))
            throw new CheckpointException(path, "not valid UTF-8", null);
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(text);
        }
        catch (JsonException e)
        {
            throw new CheckpointException(path, $"not valid JSON: {e.Message}", e);
        }
        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new CheckpointException(path, $"top level is a {root.ValueKind}, expected an object", null);
            var version = Integer(path, root, "format_version");
            if (version != FormatVersion)
                throw new CheckpointException(path, $"unsupported format_version {version} (this build reads version {FormatVersion})", null);

            if (!root.TryGetProperty("recipe", out var recipeElement) || recipeElement.ValueKind != JsonValueKind.Object)
                throw new CheckpointException(path, "missing or non-object 'recipe'", null);
            Recipe recipe;
            try
            {
                recipe = Recipe.FromJson(recipeElement.GetRawText());
            }
            catch (Exception e) when (e is JsonException or FormatException or NotSupportedException or ArgumentException)
            {
                throw new CheckpointException(path, $"'recipe' cannot be read: {e.Message}", e);
            }

            var extra = new Dictionary<string, string>(StringComparer.Ordinal);
            if (root.TryGetProperty("extra", out var extraElement))
            {
                if (extraElement.ValueKind != JsonValueKind.Object)
                    throw new CheckpointException(path, "'extra' is not an object", null);
                foreach (var p in extraElement.EnumerateObject())
                {
                    if (p.Value.ValueKind != JsonValueKind.String)
                        throw new CheckpointException(path, $"'extra.{p.Name}' is a {p.Value.ValueKind}, expected a string", null);
                    extra[p.Name] = p.Value.GetString()!;
                }
            }

            if (!root.TryGetProperty("files", out var filesElement) || filesElement.ValueKind != JsonValueKind.Object)
                throw new CheckpointException(path, "missing or non-object 'files'", null);
            var files = new Dictionary<string, (long, string)>(StringComparer.Ordinal);
            foreach (var p in filesElement.EnumerateObject())
            {
                if (p.Value.ValueKind != JsonValueKind.Object)
                    throw new CheckpointException(path, $"'files.{p.Name}' is not an object", null);
                var bytes = Integer(path, p.Value, "bytes", $"files.{p.Name}.");
                if (!p.Value.TryGetProperty("sha256", out var sha) || sha.ValueKind != JsonValueKind.String
                    || sha.GetString() is not { Length: 64 } shaText || !shaText.All(char.IsAsciiHexDigit))
                    throw new CheckpointException(path, $"'files.{p.Name}.sha256' is missing or not 64 hex digits", null);
                files[p.Name] = (bytes, shaText.ToLowerInvariant());
            }

            var manifest = new Manifest(recipe, Integer(path, root, "step"), Integer(path, root, "epoch"),
                Integer(path, root, "cursor"), Integer(path, root, "seed"), extra, files);
            CheckRanges(path, manifest);
            return manifest;
        }
    }

    /// <summary>
    /// The manifest's numbers against their ranges and each other, so that a damaged or hand-edited checkpoint is refused
    /// at load instead of resuming into NaN weights (an Adam update count of -1 divides by zero in the bias correction)
    /// or reading outside the data.
    /// </summary>
    private static void CheckRanges(string path, Manifest m)
    {
        static string Text(long v) => v.ToString(CultureInfo.InvariantCulture);
        void AtLeast(string field, long value, long min)
        {
            if (value < min) throw new CheckpointException(path, $"'{field}' is {Text(value)}, expected an integer >= {Text(min)}", null);
        }
        AtLeast("step", m.Step, 0);
        AtLeast("epoch", m.Epoch, 0);
        AtLeast("cursor", m.Cursor, 0);
        foreach (var (name, (bytes, _)) in m.Files) AtLeast($"files.{name}.bytes", bytes, 0);
        if (m.Seed != m.Recipe.Seed)
            throw new CheckpointException(path, $"'seed' is {Text(m.Seed)}, expected {Text(m.Recipe.Seed)} (the recipe's seed)", null);
        if (m.Extra.TryGetValue(TrainSizeKey, out var sizeText))
        {
            if (!long.TryParse(sizeText, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var size) || size < 1)
                throw new CheckpointException(path, $"'extra.{TrainSizeKey}' is {Quote(sizeText)}, expected an integer >= 1", null);
            if (m.Cursor >= size)
                throw new CheckpointException(path, $"'cursor' is {Text(m.Cursor)}, expected an integer < {Text(size)} (the training-set size in 'extra.{TrainSizeKey}')", null);
        }
        if (m.Extra.TryGetValue(OptimizerStepKey, out var stepText)
            && (!long.TryParse(stepText, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var updates) || updates != m.Step))
            throw new CheckpointException(path, $"'extra.{OptimizerStepKey}' is {Quote(stepText)}, expected {Text(m.Step)} (the checkpoint's 'step': Adam takes one update per step)", null);
        // RUN/checkpoints/<step>/: a folder named by a step must hold that step (a copy elsewhere may have any name).
        var folderName = Path.GetFileName(Path.GetDirectoryName(path));
        if (folderName is { Length: > 0 } && folderName.All(char.IsAsciiDigit)
            && long.TryParse(folderName, NumberStyles.None, CultureInfo.InvariantCulture, out var named) && named != m.Step)
            throw new CheckpointException(path, $"'step' is {Text(m.Step)}, but the folder is named {folderName}", null);
    }

    /// <summary>A manifest string as the message shows it: integers bare, anything else in quotes.</summary>
    private static string Quote(string text) =>
        long.TryParse(text, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out var v) ? v.ToString(CultureInfo.InvariantCulture) : JsonSerializer.Serialize(text);

    private static long Integer(string path, JsonElement obj, string key, string prefix = "")
    {
        if (!obj.TryGetProperty(key, out var value))
            throw new CheckpointException(path, $"missing '{prefix}{key}'", null);
        if (value.ValueKind != JsonValueKind.Number || !value.TryGetInt64(out var result))
            throw new CheckpointException(path, $"'{prefix}{key}' is {value.GetRawText()}, expected an integer", null);
        return result;
    }

    // ---------------------------------------------------------------- files

    private static Dictionary<string, Tensor> ReadVerified(string path, long expectedBytes, string expectedSha)
    {
        if (!File.Exists(path))
            throw new CheckpointException(path, "missing file", null);
        byte[] bytes;
        try
        {
            bytes = File.ReadAllBytes(path);
        }
        catch (IOException e)
        {
            throw new CheckpointException(path, $"cannot be read: {e.Message}", e);
        }
        if (bytes.LongLength < expectedBytes)
            throw new CheckpointException(path, $"truncated: {bytes.LongLength} bytes, expected {expectedBytes}", null);
        if (bytes.LongLength > expectedBytes)
            throw new CheckpointException(path, $"size mismatch: {bytes.LongLength} bytes, expected {expectedBytes}", null);
        var actualSha = Convert.ToHexStringLower(SHA256.HashData(bytes));
        if (actualSha != expectedSha)
            throw new CheckpointException(path, $"checksum mismatch: expected {expectedSha}, got {actualSha}", null);
        try
        {
            return SafeTensorsFile.Deserialize(bytes, path).Tensors;
        }
        catch (InvalidDataException e)
        {
            throw new CheckpointException(path, e.Message.StartsWith(path + ": ", StringComparison.Ordinal) ? e.Message[(path.Length + 2)..] : e.Message, e);
        }
    }

    private static (long Bytes, string Sha256) Measure(string path)
    {
        using var file = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, 1 << 16);
        return (file.Length, Convert.ToHexStringLower(SHA256.HashData(file)));
    }

    private static void DeleteStaleTempFolders(string checkpoints)
    {
        var cutoff = DateTime.UtcNow - StaleTempAge;
        foreach (var dir in Directory.EnumerateDirectories(checkpoints, TempPrefix + "*"))
            if (Directory.GetLastWriteTimeUtc(dir) < cutoff)
                TryDelete(dir);
    }

    private static void TryDelete(string dir)
    {
        try
        {
            Directory.Delete(dir, recursive: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // Best effort: a leftover temporary folder is ignored by readers.
        }
    }
}
