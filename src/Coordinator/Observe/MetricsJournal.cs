using System.Globalization;
using System.Text.Json;
using System.Text.Json.Serialization;
using DistDiffusion.Model.Imaging;

namespace DistDiffusion.Coordinator.Observe;

/// <summary>
/// One line of OUT/metrics.jsonl: a logged step. Loss and samples/s are over the steps since the previous line; the
/// step-time split (compute: the slowest worker's own computing; exchange: the rest of the wait for the gradients;
/// update: planning, summing, Adam, EMA) is the logged step's, and only distributed steps have it.
/// </summary>
public sealed record StepRecord(
    [property: JsonPropertyName("step")] long Step,
    [property: JsonPropertyName("epoch")] long Epoch,
    [property: JsonPropertyName("loss")] double Loss,
    [property: JsonPropertyName("grad_norm")] double GradNorm,
    [property: JsonPropertyName("learning_rate")] double LearningRate,
    [property: JsonPropertyName("samples_per_second")] double SamplesPerSecond,
    [property: JsonPropertyName("live_workers")] int LiveWorkers,
    [property: JsonPropertyName("compute_seconds")] double? ComputeSeconds = null,
    [property: JsonPropertyName("exchange_seconds")] double? ExchangeSeconds = null,
    [property: JsonPropertyName("update_seconds")] double? UpdateSeconds = null,
    [property: JsonPropertyName("time")] DateTimeOffset? Time = null);

/// <summary>
/// OUT/metrics.jsonl (one <see cref="StepRecord"/> per logged step, appended: a resumed run adds to it, never rewrites it)
/// and OUT/loss.png drawn from it. Each record written is also handed to <paramref name="tensorBoard"/>, if given, as it
/// went into the file.
/// </summary>
public sealed class MetricsJournal(string runDir, TensorBoardSink? tensorBoard = null)
{
    public const string FileName = "metrics.jsonl";
    public const string LossPlotName = "loss.png";

    private static readonly JsonSerializerOptions Json = new()
    {
        NumberHandling = JsonNumberHandling.AllowNamedFloatingPointLiterals,
        DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull,
    };

    private readonly object _lock = new();

    public string Path { get; } = System.IO.Path.Combine(runDir, FileName);
    public string LossPlotPath { get; } = System.IO.Path.Combine(runDir, LossPlotName);

    public void Append(StepRecord record)
    {
        var stamped = record with { Time = record.Time ?? DateTimeOffset.UtcNow };
        var line = JsonSerializer.Serialize(stamped, Json) + "\n";
        lock (_lock) File.AppendAllText(Path, line);
        tensorBoard?.Record(stamped);
    }

    /// <summary>The TensorBoard sink the records go to as well, if any (the trainers hand it their pictures).</summary>
    public TensorBoardSink? TensorBoard => tensorBoard;

    /// <summary>Every record in the file (a torn last line, from a killed process, is skipped).</summary>
    public static IReadOnlyList<StepRecord> Read(string path) => ReadAll(path);

    private static List<StepRecord> ReadAll(string path)
    {
        var records = new List<StepRecord>();
        if (!File.Exists(path)) return records;
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
        using var reader = new StreamReader(stream);
        while (reader.ReadLine() is { } line)
        {
            if (line.Length == 0) continue;
            try
            {
                if (JsonSerializer.Deserialize<StepRecord>(line, Json) is { } r) records.Add(r);
            }
            catch (JsonException)
            {
                // A line cut short by a kill: the ones after it are whole.
            }
        }
        return records;
    }

    /// <summary>The last <paramref name="max"/> records.</summary>
    public IReadOnlyList<StepRecord> Tail(int max)
    {
        List<StepRecord> all;
        lock (_lock) all = ReadAll(Path);
        return all.Count <= max ? all : all.GetRange(all.Count - max, max);
    }

    /// <summary>Redraws OUT/loss.png from the whole file.</summary>
    public void WriteLossPlot(string recipeName)
    {
        List<StepRecord> records;
        lock (_lock) records = ReadAll(Path);
        LinePlot.Save(records.Select(r => ((double)r.Step, r.Loss)).ToList(), LossPlotPath,
            string.Create(CultureInfo.InvariantCulture, $"{recipeName}: loss by step"));
    }
}

/// <summary>Accumulates the steps between two logged ones: the mean loss and the rate over them.</summary>
public sealed class StepInterval
{
    private double _lossSum;
    private int _steps;
    private long _samples;
    private long _since = System.Diagnostics.Stopwatch.GetTimestamp();

    public void Add(double loss, int batchSize)
    {
        _lossSum += loss;
        _steps++;
        _samples += batchSize;
    }

    /// <summary>(mean loss, samples per second) since the last call, and starts a new interval.</summary>
    public (double Loss, double SamplesPerSecond) Take()
    {
        var seconds = System.Diagnostics.Stopwatch.GetElapsedTime(_since).TotalSeconds;
        var result = (_steps == 0 ? double.NaN : _lossSum / _steps, seconds > 0 ? _samples / seconds : 0);
        (_lossSum, _steps, _samples, _since) = (0, 0, 0, System.Diagnostics.Stopwatch.GetTimestamp());
        return result;
    }
}
