using DistDiffusion.Model;
using System.Buffers.Binary;
using System.IO.Compression;
using System.Text;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Imaging;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Fuzz.Targets;

/// <summary>
/// MNIST-style IDX files (<see cref="IdxReader"/>): the input is written once under a plain name and once named .gz, and
/// read as images and as labels from both. Documented error: <see cref="InvalidDataException"/>. Memory: a raw file costs
/// its bytes and their float32 copy; gzip data is inflated at most to what the header declares (at most
/// <see cref="IdxReader.MaxDataBytes"/>), which deflate's ~1032:1 ratio bounds by the input's size.
/// </summary>
public sealed class IdxTarget : FuzzTarget
{
    private readonly string _plain, _gz;

    public IdxTarget()
    {
        var dir = Scratch("idx");
        _plain = Path.Combine(dir, "input-idx");
        _gz = Path.Combine(dir, "input-idx.gz");
    }

    public override string Name => "idx";

    protected override void Run(byte[] input)
    {
        File.WriteAllBytes(_plain, input);
        File.WriteAllBytes(_gz, input);
        var outcomes = new List<string>();
        foreach (var path in new[] { _plain, _gz })
        {
            outcomes.Add(Read(() => IdxReader.ReadImages(path), 4, path));
            outcomes.Add(Read(() => IdxReader.ReadLabels(path), 1, path));
        }
        Note(string.Join("; ", outcomes));
    }

    /// <summary>One read; a tensor it returns has as many elements as its header declares, and is disposed.</summary>
    private static string Read(Func<Tensor> read, int rank, string path)
    {
        try
        {
            using var t = read();
            Check(t.dim() == rank, $"idx: a tensor of rank {t.dim()}, expected {rank}");
            return "read";
        }
        catch (InvalidDataException e)
        {
            Check(e.Message.StartsWith($"IDX file {path}: ", StringComparison.Ordinal), $"idx: an error that does not name the file: {e.Message}");
            return e.Message[(path.Length + 11)..].Split('(')[0].Trim();
        }
    }

    protected override bool Expected(Exception e) => e is InvalidDataException;

    protected override long AllocationLimit(byte[] input)
    {
        var gzip = input.Length >= 2 && input[0] == 0x1f && input[1] == 0x8b;
        // Per read: the file, the inflated data (its MemoryStream doubles: <= 3x), the float32 copy (4x), for 8 reads.
        var data = gzip ? Math.Min(IdxReader.MaxDataBytes, 1100L * input.Length + 64) : input.Length;
        return 8 * (input.Length + 8 * data + (16L << 20) + (1 << 16)) + (1 << 20);
    }

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        static byte[] Idx(int magic, params int[] dims)
        {
            var count = dims.Aggregate(1, (a, b) => a * b);
            var bytes = new byte[4 + 4 * dims.Length + count];
            BinaryPrimitives.WriteInt32BigEndian(bytes, magic);
            for (var i = 0; i < dims.Length; i++) BinaryPrimitives.WriteInt32BigEndian(bytes.AsSpan(4 + 4 * i), dims[i]);
            for (var i = 0; i < count; i++) bytes[4 + 4 * dims.Length + i] = (byte)(i * 37);
            return bytes;
        }
        static byte[] Gzip(byte[] raw)
        {
            using var ms = new MemoryStream();
            using (var gz = new GZipStream(ms, CompressionLevel.Optimal)) gz.Write(raw);
            return ms.ToArray();
        }
        var images = Idx(IdxReader.ImagesMagic, 3, 4, 5);
        var labels = Idx(IdxReader.LabelsMagic, 9);
        yield return ("images", images);
        yield return ("labels", labels);
        yield return ("images-gz", Gzip(images));
        yield return ("labels-gz", Gzip(labels));
        // A small gzip whose header declares more than it holds, and one that holds more than it declares.
        var claim = Idx(IdxReader.ImagesMagic, 2, 28, 28);
        BinaryPrimitives.WriteInt32BigEndian(claim.AsSpan(4), 60_000);
        yield return ("images-gz-short", Gzip(claim));
        var over = Idx(IdxReader.LabelsMagic, 200);
        BinaryPrimitives.WriteInt32BigEndian(over.AsSpan(4), 10);
        yield return ("labels-gz-long", Gzip(over));
    }
}

/// <summary>
/// PNG (and anything SkiaSharp decodes) through <see cref="PngReader.Read"/> and the image-folder data set's decoder
/// (<see cref="ImageFolderReader.Decode"/>). Documented error: <see cref="InvalidDataException"/> naming the file. Memory:
/// the decoded RGBA copy of at most <see cref="ImageLimits.MaxPixels"/> pixels.
/// </summary>
public sealed class PngTarget : FuzzTarget
{
    private readonly string _path = Path.Combine(Scratch("png"), "input.png");
    private readonly float[] _destination = new float[3 * 8 * 8];

    public override string Name => "png";

    protected override void Run(byte[] input)
    {
        File.WriteAllBytes(_path, input);
        var read = Decode(() =>
        {
            var (width, height, rgba) = PngReader.Read(_path);
            Check(width > 0 && height > 0 && rgba.LongLength == 4L * width * height, $"png: {width}x{height} with {rgba.LongLength} bytes of RGBA");
        });
        var folder = Decode(() => ImageFolderReader.Decode(_path, 8, 3, _destination));
        Note($"{read}; {folder}");
    }

    private string Decode(Action decode)
    {
        try
        {
            decode();
            return "decoded";
        }
        catch (InvalidDataException e)
        {
            Check(e.Message.StartsWith($"image {_path}: ", StringComparison.Ordinal), $"png: an error that does not name the file: {e.Message}");
            return e.Message[(_path.Length + 8)..].Split('(')[0].Trim();
        }
    }

    protected override bool Expected(Exception e) => e is InvalidDataException;

    protected override long AllocationLimit(byte[] input) => 2 * (4 * ImageLimits.MaxPixels) + 16L * input.Length + (4 << 20);

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        foreach (var (w, h, name) in new[] { (3, 2, "rgba-3x2"), (16, 9, "rgba-16x9") })
        {
            var rgba = new byte[w * h * 4];
            for (var i = 0; i < rgba.Length; i++) rgba[i] = (byte)(i * 29);
            yield return (name, PngIO.EncodeRgba(w, h, rgba));
        }
    }
}

/// <summary>
/// safetensors bytes through <see cref="SafeTensorsFile.Deserialize"/>. Documented error: <see cref="InvalidDataException"/>
/// naming the source. Memory: the tensors' data is the file's data buffer (checked: their bytes add up to at most the
/// input), the header at most <see cref="SafeTensorsFile.MaxHeaderBytes"/>.
/// </summary>
public sealed class SafeTensorsTarget : FuzzTarget
{
    public override string Name => "safetensors";

    protected override void Run(byte[] input)
    {
        var (tensors, metadata) = SafeTensorsFile.Deserialize(input, "fuzz.safetensors");
        try
        {
            var bytes = tensors.Values.Sum(t => t.NumberOfElements * t.ElementSize);
            Check(bytes <= input.Length, $"safetensors: {bytes} bytes of tensors from a {input.Length}-byte file");
            // What was read writes back and reads again to the same tensors (the format round-trips).
            var again = SafeTensorsFile.Deserialize(SafeTensorsFile.Serialize(tensors, metadata), "round trip");
            try
            {
                Check(again.Tensors.Count == tensors.Count && again.Metadata.Count == metadata.Count, "safetensors: the round trip changed the entries");
                foreach (var (name, t) in tensors)
                    Check(again.Tensors.TryGetValue(name, out var u) && u.dtype == t.dtype && u.shape.SequenceEqual(t.shape) && u.bytes.SequenceEqual(t.bytes),
                        $"safetensors: tensor '{name}' differs after the round trip");
            }
            finally
            {
                SafeTensorsFile.DisposeAll(again.Tensors.Values);
            }
        }
        finally
        {
            SafeTensorsFile.DisposeAll(tensors.Values);
        }
    }

    protected override bool Expected(Exception e) => e is InvalidDataException && e.Message.StartsWith("fuzz.safetensors: ", StringComparison.Ordinal);

    // The header copied, parsed (JsonDocument), the entries; the round trip writes and reads the same again.
    protected override long AllocationLimit(byte[] input) => 64L * input.Length + (4 << 20);

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        using var a = torch.arange(6, ScalarType.Float32).reshape(2, 3);
#pragma warning disable CA1861 // built once per seed list
        using var b = torch.tensor(new long[] { 1, -2 });
        using var c = torch.zeros([0, 4], ScalarType.BFloat16);
        using var d = torch.tensor(new[] { true, false, true });
#pragma warning restore CA1861
        yield return ("two", SafeTensorsFile.Serialize(new Dictionary<string, Tensor> { ["a"] = a, ["b"] = b }));
        yield return ("meta", SafeTensorsFile.Serialize(new Dictionary<string, Tensor> { ["c"] = c, ["d"] = d }, new Dictionary<string, string> { ["format"] = "pt", ["k"] = "v" }));
        yield return ("empty", SafeTensorsFile.Serialize(new Dictionary<string, Tensor>()));
    }
}

/// <summary>
/// A checkpoint folder's checkpoint.json through <see cref="CheckpointStore.Load"/> (the folder, named 7 as a step folder
/// is, holds three small valid tensor files whose sizes and SHA-256 the seeds list, so a manifest gets past the files).
/// Documented error: <see cref="CheckpointException"/> naming the file.
/// </summary>
public sealed class CheckpointManifestTarget : FuzzTarget
{
    private readonly string _folder;
    private readonly string _manifest;

    private bool _ready;

    public CheckpointManifestTarget()
    {
        _folder = Path.Combine(Scratch("manifest"), "checkpoints", "7");
        _manifest = Path.Combine(_folder, CheckpointStore.ManifestFileName);
    }

    public override string Name => "checkpoint-manifest";

    private static IEnumerable<(string Name, byte[] Bytes)> TensorFiles()
    {
        using var w = torch.arange(4, ScalarType.Float32);
        using var m = torch.ones(4, ScalarType.Float32);
        yield return (CheckpointStore.ModelFileName, SafeTensorsFile.Serialize(new Dictionary<string, Tensor> { ["w"] = w }));
        yield return (CheckpointStore.EmaFileName, SafeTensorsFile.Serialize(new Dictionary<string, Tensor> { ["w"] = w }));
        yield return (CheckpointStore.OptimizerFileName, SafeTensorsFile.Serialize(new Dictionary<string, Tensor> { ["exp_avg.w"] = m, ["exp_avg_sq.w"] = m }));
    }

    protected override void Run(byte[] input)
    {
        if (!_ready)
        {
            // At the first input, not in the constructor: under AFL nothing instrumented may run before the fuzzing loop.
            Directory.CreateDirectory(_folder);
            foreach (var (name, bytes) in TensorFiles())
                File.WriteAllBytes(Path.Combine(_folder, name), bytes);
            _ready = true;
        }
        File.WriteAllBytes(_manifest, input);
        var data = CheckpointStore.Load(_folder);
        try
        {
            Check(data.Step == 7 && data.Step >= 0 && data.Epoch >= 0 && data.Cursor >= 0, $"checkpoint-manifest: step {data.Step} epoch {data.Epoch} cursor {data.Cursor} loaded from folder 7");
            Check(data.Seed == data.Recipe.Seed, "checkpoint-manifest: a seed unlike the recipe's was loaded");
        }
        finally
        {
            data.DisposeTensors();
        }
    }

    protected override bool Expected(Exception e) => e is CheckpointException { FilePath: not null } c && c.Message.StartsWith(c.FilePath + ": ", StringComparison.Ordinal);

    protected override long AllocationLimit(byte[] input) => 64L * input.Length + (8 << 20);

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        var recipe = Recipes.Get("swissroll") with { Seed = 5 };
        string Manifest(string extra) => $$"""
            {
              "format_version": 1,
              "recipe": {{recipe.ToJson()}},
              "step": 7,
              "epoch": 1,
              "cursor": 3,
              "seed": 5,
              "created_utc": "2026-01-01T00:00:00.0000000Z",
              "extra": { {{extra}} },
              "files": {
            {{string.Join(",\n", TensorFiles().Select(f => $"    \"{f.Name}\": {{ \"bytes\": {f.Bytes.Length}, \"sha256\": \"{Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(f.Bytes))}\" }}"))}}
              }
            }
            """;
        yield return ("valid", Encoding.UTF8.GetBytes(Manifest($"\"{CheckpointStore.OptimizerStepKey}\": \"7\", \"{CheckpointStore.TrainSizeKey}\": \"100\"")));
        yield return ("no-extra", Encoding.UTF8.GetBytes(Manifest("")));
    }
}

/// <summary>
/// Recipes from outside: a recipe's JSON (as in a checkpoint, the coordinator's Welcome or a --recipe file) through
/// <see cref="Recipe.FromJson"/> and <see cref="Recipe.Validate"/>, and --set lines through <see cref="Recipe.WithOverrides"/>.
/// The first byte picks which (even: JSON, odd: --set lines, one per line, on the recipe the rest of the first line names).
/// Documented errors: ArgumentException (not its null-argument kind), JsonException, FormatException, NotSupportedException,
/// with a message. A recipe that validates must come back equal from its own JSON.
/// </summary>
public sealed class RecipeTarget : FuzzTarget
{
    public override string Name => "recipe";

    protected override void Run(byte[] input)
    {
        if (input.Length == 0) return;
        var text = Encoding.UTF8.GetString(input.AsSpan(1));
        Recipe recipe;
        if ((input[0] & 1) == 0)
        {
            recipe = Recipe.FromJson(text);
            recipe.Validate();
        }
        else
        {
            var lines = text.Split('\n');
            recipe = Recipes.Get(lines[0].Trim()).WithOverrides(lines.Skip(1).Where(l => l.Length > 0));
        }
        var again = Recipe.FromJson(recipe.ToJson());
        Check(again.Equals(recipe), "recipe: a valid recipe reads back from its JSON as another recipe");
        again.Validate();
    }

    protected override bool Expected(Exception e) =>
        e is ArgumentException and not ArgumentNullException or System.Text.Json.JsonException or FormatException or NotSupportedException;

    protected override long AllocationLimit(byte[] input) => 256L * input.Length + (4 << 20);

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        foreach (var r in Recipes.All)
            yield return ("json-" + r.Name, [0, .. Encoding.UTF8.GetBytes(r.ToJson())]);
        yield return ("set-swissroll", [1, .. "swissroll\nhidden-size=32\nbatch-size=61\nmicro-batches=8\nema-decay=0.9\nlearning-rate=2e-4\n"u8]);
        yield return ("set-mnist", [1, .. "mnist-small\nchannel-multipliers=1,2\ndata-path=/tmp/x\nclasses=10\nlabel-dropout=0.1\nguidance=2\nrandom-flip=false\n"u8]);
    }
}
