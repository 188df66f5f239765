using System.Security.Cryptography;
using System.Text.Json;
using System.Text.Json.Nodes;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Checkpoints;

public sealed class CheckpointStoreTests : IDisposable
{
    private readonly TempFolder _run = new("distdiffusion-ckpt");
    private readonly List<Tensor> _owned = [];

    public void Dispose()
    {
        TensorAssert.DisposeAll(_owned);
        _run.Dispose();
    }

    private Tensor Own(Tensor t)
    {
        _owned.Add(t);
        return t;
    }

    internal CheckpointData Sample(long step, bool withEma = true)
    {
        var w = Own(torch.arange(0, 6, dtype: ScalarType.Float32).reshape(2, 3) * (step + 1));
        var b = Own(torch.tensor(new float[] { 0.25f, -0.5f }));
        var model = new Dictionary<string, Tensor> { ["layer.weight"] = w, ["layer.bias"] = b };
        var ema = withEma
            ? new Dictionary<string, Tensor> { ["layer.weight"] = Own(w * 0.5f), ["layer.bias"] = Own(b * 0.5f) }
            : new Dictionary<string, Tensor>();
        var optimizer = new Dictionary<string, Tensor>
        {
            ["exp_avg.layer.weight"] = Own(torch.full(new long[] { 2, 3 }, 0.125f)),
            ["exp_avg_sq.layer.weight"] = Own(torch.full(new long[] { 2, 3 }, 1e-6, ScalarType.Float64)),
            ["step_counts"] = Own(torch.tensor(new long[] { step, step })),
        };
        return new CheckpointData(
            new Recipe { Name = "test", Timesteps = 10 } with { Seed = 1234 },
            step, Epoch: 3, Cursor: 77, Seed: 1234,
            model, ema, optimizer,
            new Dictionary<string, string> { ["optimizer.step"] = step.ToString(System.Globalization.CultureInfo.InvariantCulture), ["note"] = "x" });
    }

    private static void DisposeLoaded(CheckpointData d)
    {
        TensorAssert.DisposeAll(d.Model.Values);
        TensorAssert.DisposeAll(d.Ema.Values);
        TensorAssert.DisposeAll(d.Optimizer.Values);
    }

    private static void AssertSame(CheckpointData expected, CheckpointData actual)
    {
        Assert.Equal(expected.Recipe, actual.Recipe);
        Assert.Equal(expected.Step, actual.Step);
        Assert.Equal(expected.Epoch, actual.Epoch);
        Assert.Equal(expected.Cursor, actual.Cursor);
        Assert.Equal(expected.Seed, actual.Seed);
        Assert.Equal(expected.Extra.OrderBy(kv => kv.Key), actual.Extra.OrderBy(kv => kv.Key));
        TensorAssert.BitEqual(expected.Model, actual.Model, "model");
        TensorAssert.BitEqual(expected.Ema, actual.Ema, "ema");
        TensorAssert.BitEqual(expected.Optimizer, actual.Optimizer, "optimizer");
    }

    private string Folder(long step) => Path.Combine(_run.Path, "checkpoints", step.ToString(System.Globalization.CultureInfo.InvariantCulture));

    [Fact]
    public void SaveThenLoadRoundTrips()
    {
        var data = Sample(42);
        var folder = CheckpointStore.Save(_run.Path, data);
        Assert.Equal(Folder(42), folder);
        Assert.Equal(
            new[] { "checkpoint.json", "ema.safetensors", "model.safetensors", "optimizer.safetensors" },
            Directory.GetFiles(folder).Select(Path.GetFileName).Order(StringComparer.Ordinal));
        Assert.Empty(Directory.GetDirectories(Path.Combine(_run.Path, "checkpoints"), ".tmp-*"));

        var loaded = CheckpointStore.Load(folder);
        try { AssertSame(data, loaded); }
        finally { DisposeLoaded(loaded); }
    }

    [Fact]
    public void ManifestRecordsEverythingTheSpecNames()
    {
        var data = Sample(7);
        var folder = CheckpointStore.Save(_run.Path, data);
        var manifest = JsonNode.Parse(File.ReadAllText(Path.Combine(folder, "checkpoint.json")))!.AsObject();
        Assert.Equal(CheckpointStore.FormatVersion, (int)manifest["format_version"]!);
        Assert.Equal(data.Recipe, Recipe.FromJson(manifest["recipe"]!.ToJsonString()));
        Assert.Equal(7, (long)manifest["step"]!);
        Assert.Equal(3, (long)manifest["epoch"]!);
        Assert.Equal(77, (long)manifest["cursor"]!);
        Assert.Equal(1234, (long)manifest["seed"]!);
        var created = DateTime.Parse((string)manifest["created_utc"]!, System.Globalization.CultureInfo.InvariantCulture,
            System.Globalization.DateTimeStyles.RoundtripKind);
        Assert.Equal(DateTimeKind.Utc, created.Kind);
        Assert.True(Math.Abs((DateTime.UtcNow - created).TotalMinutes) < 5);
        Assert.Equal("7", (string)manifest["extra"]!["optimizer.step"]!);
        foreach (var name in new[] { "model.safetensors", "ema.safetensors", "optimizer.safetensors" })
        {
            var bytes = File.ReadAllBytes(Path.Combine(folder, name));
            Assert.Equal(bytes.LongLength, (long)manifest["files"]![name]!["bytes"]!);
            Assert.Equal(Convert.ToHexStringLower(SHA256.HashData(bytes)), (string)manifest["files"]![name]!["sha256"]!);
        }
        // The tensor files are plain safetensors files.
        var (model, meta) = SafeTensorsFile.Read(Path.Combine(folder, "model.safetensors"));
        try
        {
            TensorAssert.BitEqual(data.Model, model, "model");
            Assert.Equal("pt", meta["format"]);
        }
        finally { TensorAssert.DisposeAll(model.Values); }
    }

    [Fact]
    public void EmptyEmaRoundTrips()
    {
        var data = Sample(1, withEma: false);
        var loaded = CheckpointStore.Load(CheckpointStore.Save(_run.Path, data));
        try
        {
            Assert.Empty(loaded.Ema);
            AssertSame(data, loaded);
        }
        finally { DisposeLoaded(loaded); }
    }

    [Fact]
    public void RunFolderResolvesToHighestCompleteCheckpoint()
    {
        foreach (var step in new long[] { 20, 5, 100 })
            CheckpointStore.Save(_run.Path, Sample(step));
        var checkpoints = Path.Combine(_run.Path, "checkpoints");
        // Leftovers a reader must ignore: a crashed save (even one that got as far as its manifest),
        // a step folder without a manifest, and an unrelated folder.
        var crashed = Path.Combine(checkpoints, ".tmp-900-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(crashed);
        File.Copy(Path.Combine(Folder(100), "checkpoint.json"), Path.Combine(crashed, "checkpoint.json"));
        Directory.CreateDirectory(Path.Combine(checkpoints, "500"));
        Directory.CreateDirectory(Path.Combine(checkpoints, "best"));
        File.Copy(Path.Combine(Folder(100), "checkpoint.json"), Path.Combine(checkpoints, "best", "checkpoint.json"));

        Assert.Equal(new long[] { 5, 20, 100 }, CheckpointStore.List(_run.Path).Select(c => c.Step));
        Assert.Equal(Folder(100), CheckpointStore.List(_run.Path)[^1].Folder);
        Assert.Equal(Folder(100), CheckpointStore.ResolveCheckpointFolder(_run.Path));
        Assert.Equal(Folder(20), CheckpointStore.ResolveCheckpointFolder(Folder(20)));
        Assert.Equal(Folder(20), CheckpointStore.ResolveCheckpointFolder(Path.Combine(Folder(20), "checkpoint.json")));

        var latest = CheckpointStore.Load(_run.Path);
        try { AssertSame(Sample(100), latest); }
        finally { DisposeLoaded(latest); }
        var older = CheckpointStore.Load(Folder(5));
        try { Assert.Equal(5, older.Step); }
        finally { DisposeLoaded(older); }
    }

    [Fact]
    public void SavingTheSameStepTwiceThrowsAndKeepsTheFirst()
    {
        var first = Sample(10);
        CheckpointStore.Save(_run.Path, first);
        var before = Directory.GetFiles(Folder(10)).ToDictionary(f => f, File.ReadAllBytes);

        var e = Assert.Throws<IOException>(() => CheckpointStore.Save(_run.Path, Sample(10) with { Epoch = 99 }));
        Assert.Contains(Folder(10), e.Message, StringComparison.Ordinal);
        Assert.IsNotType<CheckpointException>(e);

        foreach (var (file, bytes) in before)
            Assert.Equal(bytes, File.ReadAllBytes(file));
        Assert.Empty(Directory.GetDirectories(Path.Combine(_run.Path, "checkpoints"), ".tmp-*"));
        var loaded = CheckpointStore.Load(_run.Path);
        try { AssertSame(first, loaded); }
        finally { DisposeLoaded(loaded); }
    }

    /// <summary>
    /// Pins the platform behaviour the final rename relies on when two savers race past the existence check:
    /// POSIX rename(2) would silently replace an empty target folder, .NET's Directory.Move must refuse instead.
    /// </summary>
    [Fact]
    public void DirectoryMoveRefusesAnExistingEmptyTarget()
    {
        var source = Path.Combine(_run.Path, "a");
        var target = Path.Combine(_run.Path, "b");
        Directory.CreateDirectory(source);
        File.WriteAllText(Path.Combine(source, "f"), "x");
        Directory.CreateDirectory(target);
        Assert.Throws<IOException>(() => Directory.Move(source, target));
        Assert.True(File.Exists(Path.Combine(source, "f")));
        Assert.Empty(Directory.GetFileSystemEntries(target));
    }

    [Fact]
    public void SaveDeletesOnlyStaleTemporaryFolders()
    {
        var checkpoints = Path.Combine(_run.Path, "checkpoints");
        var stale = Path.Combine(checkpoints, ".tmp-3-" + Guid.NewGuid().ToString("N"));
        var fresh = Path.Combine(checkpoints, ".tmp-4-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(stale);
        Directory.CreateDirectory(fresh);
        Directory.SetLastWriteTimeUtc(stale, DateTime.UtcNow.AddDays(-1));

        CheckpointStore.Save(_run.Path, Sample(5));
        Assert.False(Directory.Exists(stale), "a day-old temporary folder should be cleaned up");
        Assert.True(Directory.Exists(fresh), "a recent temporary folder may belong to a save in progress");
    }

    [Fact]
    public void UnsupportedTensorLeavesNoCheckpointBehind()
    {
        var data = Sample(8);
        var bad = new Dictionary<string, Tensor>(data.Optimizer) { ["weird"] = Own(torch.zeros(2, dtype: ScalarType.Int16)) };
        Assert.Throws<ArgumentException>(() => CheckpointStore.Save(_run.Path, data with { Optimizer = bad }));
        Assert.Empty(CheckpointStore.List(_run.Path));
        Assert.Empty(Directory.GetDirectories(Path.Combine(_run.Path, "checkpoints")));
    }

    // ---------------------------------------------------------------- damaged checkpoints

    private CheckpointException LoadFails(string? path = null) =>
        Assert.Throws<CheckpointException>(() => CheckpointStore.Load(path ?? _run.Path));

    [Fact]
    public void FlippedByteIsAChecksumMismatch()
    {
        var folder = CheckpointStore.Save(_run.Path, Sample(3));
        var model = Path.Combine(folder, "model.safetensors");
        var bytes = File.ReadAllBytes(model);
        bytes[^3] ^= 0x01; // inside the tensor data: the file still parses, only the checksum can tell
        File.WriteAllBytes(model, bytes);

        var e = LoadFails();
        Assert.Contains(model, e.Message, StringComparison.Ordinal);
        Assert.Contains("checksum mismatch: expected ", e.Message, StringComparison.Ordinal);
        Assert.Equal(model, e.FilePath);
    }

    [Fact]
    public void TruncatedFileIsReported()
    {
        var folder = CheckpointStore.Save(_run.Path, Sample(3));
        var ema = Path.Combine(folder, "ema.safetensors");
        var bytes = File.ReadAllBytes(ema);
        File.WriteAllBytes(ema, bytes[..^5]);

        var e = LoadFails();
        Assert.Contains(ema, e.Message, StringComparison.Ordinal);
        Assert.Contains("truncated", e.Message, StringComparison.Ordinal);
        Assert.Contains($"expected {bytes.Length}", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void MissingFileIsReported()
    {
        var folder = CheckpointStore.Save(_run.Path, Sample(3));
        var optimizer = Path.Combine(folder, "optimizer.safetensors");
        File.Delete(optimizer);

        var e = LoadFails(folder);
        Assert.Contains(optimizer, e.Message, StringComparison.Ordinal);
        Assert.Contains("missing file", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void CorruptManifestIsReported()
    {
        var folder = CheckpointStore.Save(_run.Path, Sample(3));
        var manifest = Path.Combine(folder, "checkpoint.json");
        var text = File.ReadAllText(manifest);
        File.WriteAllText(manifest, text[..(text.Length / 2)]);

        var e = LoadFails();
        Assert.Contains(manifest, e.Message, StringComparison.Ordinal);
        Assert.Contains("not valid JSON", e.Message, StringComparison.Ordinal);
        Assert.IsAssignableFrom<JsonException>(e.InnerException);
    }

    internal static void EditManifest(string folder, Action<JsonObject> edit)
    {
        var path = Path.Combine(folder, "checkpoint.json");
        var node = JsonNode.Parse(File.ReadAllText(path))!.AsObject();
        edit(node);
        File.WriteAllText(path, node.ToJsonString());
    }

    [Fact]
    public void WrongFormatVersionIsReported()
    {
        var folder = CheckpointStore.Save(_run.Path, Sample(3));
        EditManifest(folder, m => m["format_version"] = 2);

        var e = LoadFails();
        Assert.Contains(Path.Combine(folder, "checkpoint.json"), e.Message, StringComparison.Ordinal);
        Assert.Contains("format_version 2", e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("step", "missing 'step'")]
    [InlineData("recipe", "'recipe'")]
    [InlineData("files", "'files'")]
    public void MissingManifestFieldIsReported(string field, string problem)
    {
        var folder = CheckpointStore.Save(_run.Path, Sample(3));
        EditManifest(folder, m => m.Remove(field));
        var e = LoadFails();
        Assert.Contains("checkpoint.json", e.Message, StringComparison.Ordinal);
        Assert.Contains(problem, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void EmptyRunFolderSaysThereIsNoCheckpoint()
    {
        var e1 = LoadFails();
        Assert.Contains(_run.Path, e1.Message, StringComparison.Ordinal);
        Assert.Contains("neither a checkpoint folder", e1.Message, StringComparison.Ordinal);

        Directory.CreateDirectory(Path.Combine(_run.Path, "checkpoints", ".tmp-1-abc"));
        var e2 = LoadFails();
        Assert.Contains(_run.Path, e2.Message, StringComparison.Ordinal);
        Assert.Contains("no complete checkpoint", e2.Message, StringComparison.Ordinal);
        Assert.Empty(CheckpointStore.List(_run.Path));

        var e3 = LoadFails(Path.Combine(_run.Path, "does-not-exist"));
        Assert.Contains("no such checkpoint or run folder", e3.Message, StringComparison.Ordinal);
    }

    /// <summary>Replaces optimizer.safetensors with a malformed file and updates the manifest so the checksum matches.</summary>
    internal static string BreakOptimizerFileBehindTheChecksum(string folder)
    {
        // A damaged optimizer file whose manifest entry was updated to match: only parsing can catch it,
        // and by then the model and EMA tensors have been read and must be released.
        var optimizer = Path.Combine(folder, "optimizer.safetensors");
        var garbage = new byte[] { 4, 0, 0, 0, 0, 0, 0, 0, (byte)'[', (byte)']', (byte)' ', (byte)' ' };
        File.WriteAllBytes(optimizer, garbage);
        EditManifest(folder, m =>
        {
            m["files"]!["optimizer.safetensors"]!["bytes"] = garbage.Length;
            m["files"]!["optimizer.safetensors"]!["sha256"] = Convert.ToHexStringLower(SHA256.HashData(garbage));
        });
        return optimizer;
    }

    [Fact]
    public void MalformedTensorFileWithMatchingChecksumIsReported()
    {
        var folder = CheckpointStore.Save(_run.Path, Sample(3));
        var optimizer = BreakOptimizerFileBehindTheChecksum(folder);
        var e = LoadFails();
        Assert.Contains(optimizer, e.Message, StringComparison.Ordinal);
        Assert.Contains("expected an object", e.Message, StringComparison.Ordinal);
        Assert.IsType<InvalidDataException>(e.InnerException);
    }

    // ---------------------------------------------------------------- values out of range

    /// <summary>A manifest whose numbers are out of range is refused at load, naming the field, the value and the range.</summary>
    [Theory]
    [InlineData("step", "-1", "'step' is -1, expected an integer >= 0")]
    [InlineData("epoch", "-2", "'epoch' is -2, expected an integer >= 0")]
    [InlineData("cursor", "-1", "'cursor' is -1, expected an integer >= 0")]
    [InlineData("extra.data.train_size", "77", "'cursor' is 77, expected an integer < 77 (the training-set size in 'extra.data.train_size')")]
    [InlineData("extra.data.train_size", "0", "'extra.data.train_size' is 0, expected an integer >= 1")]
    [InlineData("extra.data.train_size", "many", "'extra.data.train_size' is \"many\", expected an integer >= 1")]
    [InlineData("extra.optimizer.step", "-1", "'extra.optimizer.step' is -1, expected 3 (the checkpoint's 'step': Adam takes one update per step)")]
    [InlineData("extra.optimizer.step", "4", "'extra.optimizer.step' is 4, expected 3")]
    [InlineData("extra.optimizer.step", "", "'extra.optimizer.step' is \"\", expected 3")]
    [InlineData("seed", "99", "'seed' is 99, expected 1234 (the recipe's seed)")]
    [InlineData("files.model.safetensors.bytes", "-8", "'files.model.safetensors.bytes' is -8, expected an integer >= 0")]
    public void OutOfRangeManifestValueIsReportedNotLoaded(string field, string value, string problem)
    {
        var folder = CheckpointStore.Save(_run.Path, Sample(3));
        EditManifest(folder, m =>
        {
            if (field.StartsWith("extra.", StringComparison.Ordinal)) m["extra"]![field["extra.".Length..]] = value;
            else if (field.StartsWith("files.", StringComparison.Ordinal)) m["files"]!["model.safetensors"]!["bytes"] = long.Parse(value, System.Globalization.CultureInfo.InvariantCulture);
            else m[field] = long.Parse(value, System.Globalization.CultureInfo.InvariantCulture);
        });
        var e = LoadFails(folder);
        Assert.Contains(Path.Combine(folder, "checkpoint.json"), e.Message, StringComparison.Ordinal);
        Assert.Contains(problem, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void ManifestStepDisagreeingWithItsFolderNameIsReported()
    {
        var folder = CheckpointStore.Save(_run.Path, Sample(3));
        var renamed = Folder(30);
        Directory.Move(folder, renamed);
        var e = LoadFails();
        Assert.Contains("'step' is 3, but the folder is named 30", e.Message, StringComparison.Ordinal);
    }

    // ---------------------------------------------------------------- a step folder in the way

    /// <summary>
    /// Something at a step's name that is not a valid checkpoint (a crash of something else, a half copy, a damaged
    /// checkpoint, a stray file) must not stop the run when it saves that step again: it is moved aside and the new one written.
    /// </summary>
    [Theory]
    [InlineData("empty folder")]
    [InlineData("no manifest")]
    [InlineData("bad JSON")]
    [InlineData("checksum mismatch")]
    [InlineData("truncated file")]
    [InlineData("a file")]
    public void SaveMovesABrokenStepFolderAsideAndWritesTheCheckpoint(string damage)
    {
        var checkpoints = Path.Combine(_run.Path, "checkpoints");
        var folder = Folder(10);
        if (damage is "empty folder" or "a file")
        {
            Directory.CreateDirectory(checkpoints);
            if (damage == "a file") File.WriteAllText(folder, "not a checkpoint");
            else Directory.CreateDirectory(folder);
        }
        else
        {
            CheckpointStore.Save(_run.Path, Sample(10) with { Epoch = 1 });
            switch (damage)
            {
                case "no manifest": File.Delete(Path.Combine(folder, "checkpoint.json")); break;
                case "bad JSON": File.WriteAllText(Path.Combine(folder, "checkpoint.json"), "{\"format_version\": 1,"); break;
                case "checksum mismatch":
                    var model = Path.Combine(folder, "model.safetensors");
                    var bytes = File.ReadAllBytes(model);
                    bytes[^2] ^= 0x10;
                    File.WriteAllBytes(model, bytes);
                    break;
                case "truncated file":
                    var ema = Path.Combine(folder, "ema.safetensors");
                    File.WriteAllBytes(ema, File.ReadAllBytes(ema)[..^4]);
                    break;
            }
        }

        var data = Sample(10);
        Assert.Equal(folder, CheckpointStore.Save(_run.Path, data));
        var loaded = CheckpointStore.Load(folder);
        try { AssertSame(data, loaded); }
        finally { DisposeLoaded(loaded); }
        var aside = Assert.Single(Directory.GetFileSystemEntries(checkpoints, ".broken-10-*"));
        Assert.Equal(damage == "a file", File.Exists(aside));
        Assert.Equal(new long[] { 10 }, CheckpointStore.List(_run.Path).Select(c => c.Step));
    }

    [Fact]
    public void WriteReportsWhatItMovedAsideAndWhy()
    {
        CheckpointStore.Save(_run.Path, Sample(4));
        File.WriteAllText(Path.Combine(Folder(4), "checkpoint.json"), "[");
        Directory.CreateDirectory(Folder(8));
        var first = CheckpointStore.Write(_run.Path, Sample(4));
        var aside = Assert.Single(first.SetAside);
        Assert.Equal(Folder(4), aside.Folder);
        Assert.StartsWith(Path.Combine(_run.Path, "checkpoints", ".broken-4-"), aside.MovedTo, StringComparison.Ordinal);
        Assert.Contains("not valid JSON", aside.Reason, StringComparison.Ordinal);
        var second = CheckpointStore.Write(_run.Path, Sample(8));
        Assert.Contains("no checkpoint.json", Assert.Single(second.SetAside).Reason, StringComparison.Ordinal);
        Assert.Empty(CheckpointStore.Write(_run.Path, Sample(9)).SetAside);
    }

    [Fact]
    public void VerifyChecksEveryFileWithoutLoadingTensors()
    {
        var folder = CheckpointStore.Save(_run.Path, Sample(6));
        Assert.Equal(6, CheckpointStore.Verify(folder));
        var optimizer = Path.Combine(folder, "optimizer.safetensors");
        var bytes = File.ReadAllBytes(optimizer);
        bytes[^1] ^= 1;
        File.WriteAllBytes(optimizer, bytes);
        var e = Assert.Throws<CheckpointException>(() => CheckpointStore.Verify(folder));
        Assert.Equal(optimizer, e.FilePath);
        Assert.Contains("checksum mismatch", e.Message, StringComparison.Ordinal);
    }

    // ---------------------------------------------------------------- retention

    [Fact]
    public void RetentionKeepsTheLastNAndEveryKthStepAndDeletesTheRest()
    {
        var retention = new CheckpointRetention(keepLast: 3, keepEvery: 50);
        var deleted = new List<string>();
        foreach (var step in Enumerable.Range(1, 12).Select(i => i * 10L))
        {
            var saved = CheckpointStore.Write(_run.Path, Sample(step), retention);
            Assert.Equal(Folder(step), saved.Folder);
            Assert.Empty(saved.PruneProblems);
            deleted.AddRange(saved.Deleted);
        }
        Assert.Equal(new long[] { 50, 100, 110, 120 }, CheckpointStore.List(_run.Path).Select(c => c.Step));
        Assert.Equal(new long[] { 10, 20, 30, 40, 60, 70, 80, 90 }.Select(Folder), deleted);
        Assert.Equal(["100", "110", "120", "50"], Directory.GetFileSystemEntries(Path.Combine(_run.Path, "checkpoints")).Select(Path.GetFileName).Order(StringComparer.Ordinal));
    }

    [Fact]
    public void RetentionNeverDeletesTheCheckpointJustWrittenNorAnythingWhenTheSaveFails()
    {
        foreach (var step in new long[] { 10, 20, 30 })
            CheckpointStore.Save(_run.Path, Sample(step));
        var keepOne = new CheckpointRetention(keepLast: 1);

        // A save that fails (here: a dtype the format lacks) deletes nothing.
        var data = Sample(40);
        var bad = new Dictionary<string, Tensor>(data.Optimizer) { ["weird"] = Own(torch.zeros(2, dtype: ScalarType.Int16)) };
        Assert.Throws<ArgumentException>(() => CheckpointStore.Write(_run.Path, data with { Optimizer = bad }, keepOne));
        Assert.Equal(new long[] { 10, 20, 30 }, CheckpointStore.List(_run.Path).Select(c => c.Step));

        // An older step written into a run that has newer ones (a resumed branch): the newest and the new one stay.
        var saved = CheckpointStore.Write(_run.Path, Sample(25), keepOne);
        Assert.Equal(new[] { Folder(10), Folder(20) }, saved.Deleted);
        Assert.Equal(new long[] { 25, 30 }, CheckpointStore.List(_run.Path).Select(c => c.Step));
    }

    [Fact]
    public void PruneRemovesTrashACrashLeftBehind()
    {
        CheckpointStore.Save(_run.Path, Sample(1));
        var trash = Path.Combine(_run.Path, "checkpoints", ".deleting-0-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(trash);
        File.WriteAllText(Path.Combine(trash, "model.safetensors"), "half deleted");
        CheckpointStore.Write(_run.Path, Sample(2), CheckpointRetention.Default);
        Assert.False(Directory.Exists(trash));
        Assert.Equal(new long[] { 1, 2 }, CheckpointStore.List(_run.Path).Select(c => c.Step));
    }

    [Theory]
    [InlineData(0, null, "--keep-checkpoints 0: expected a count >= 1")]
    [InlineData(-2, null, "--keep-checkpoints -2: expected a count >= 1")]
    [InlineData(5, 0, "--keep-every 0: expected a step interval >= 1")]
    [InlineData(5, -100, "--keep-every -100: expected a step interval >= 1")]
    public void RetentionOutOfRangeIsAClearError(int keepLast, int? keepEvery, string message)
    {
        var e = Assert.Throws<ArgumentException>(() => new CheckpointRetention(keepLast, keepEvery));
        Assert.StartsWith(message, e.Message, StringComparison.Ordinal);
    }
}
