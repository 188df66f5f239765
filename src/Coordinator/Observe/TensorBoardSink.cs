using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace DistDiffusion.Coordinator.Observe;

/// <summary>
/// RUN/tensorboard/: the run's TensorBoard event file. <see cref="MetricsJournal"/> hands it each record it wrote to
/// metrics.jsonl (the source of truth), which becomes one event of scalars tagged with metrics.jsonl's keys at the
/// record's step and time; the trainers hand it each sample picture they wrote, which becomes an image summary tagged
/// "samples". The file is opened at the first record (none in --sample-only), flushed after every event so a live
/// TensorBoard sees progress, and closed by <see cref="Dispose"/>. A failure to write is reported once through the
/// warning callback and ends the event file for the run (a torn record would hide every later one from TensorBoard);
/// it never reaches the trainer. A picture that cannot be read is skipped with a warning (once), the scalars go on.
/// </summary>
public sealed class TensorBoardSink : IDisposable
{
    public const string FolderName = "tensorboard";
    public const string PictureTag = "samples";

    private readonly object _lock = new();
    private readonly Action<string> _warn;
    private readonly TimeProvider _clock;
    private readonly List<(string Tag, float Value)> _values = new(9);
    private TensorBoardEventFile? _file;
    private bool _failed;
    private bool _pictureWarned;
    private bool _disposed;

    /// <param name="runDir">The run folder; the event file goes to RUN/tensorboard/.</param>
    /// <param name="warn">Told once, in words, when the event file stops or a picture is skipped.</param>
    /// <param name="clock">The time of pictures and of the file's name (tests move it by hand).</param>
    public TensorBoardSink(string runDir, Action<string> warn, TimeProvider? clock = null)
    {
        ArgumentNullException.ThrowIfNull(runDir);
        Directory = Path.Combine(runDir, FolderName);
        _warn = warn ?? throw new ArgumentNullException(nameof(warn));
        _clock = clock ?? TimeProvider.System;
    }

    /// <summary>RUN/tensorboard: `tensorboard --logdir RUN` (or a folder of runs) reads it.</summary>
    public string Directory { get; }

    /// <summary>The event file written so far, if one was opened.</summary>
    public string? EventFilePath
    {
        get
        {
            lock (_lock) return _file?.Path;
        }
    }

    /// <summary>Registers the sink of <paramref name="runDir"/> for the coordinator's services, warning through their logger.</summary>
    public static void Register(IServiceCollection services, string runDir) =>
        services.AddSingleton(s =>
        {
            var log = s.GetRequiredService<ILogger<TensorBoardSink>>();
            return new TensorBoardSink(runDir, message => log.LogWarning("{Problem}", message));
        });

    /// <summary>The scalars of one metrics.jsonl line, at its step and time (a distributed step's split too).</summary>
    public void Record(StepRecord record)
    {
        ArgumentNullException.ThrowIfNull(record);
        lock (_lock)
        {
            _values.Clear();
            _values.Add(("loss", (float)record.Loss));
            _values.Add(("learning_rate", (float)record.LearningRate));
            _values.Add(("grad_norm", (float)record.GradNorm));
            _values.Add(("samples_per_second", (float)record.SamplesPerSecond));
            _values.Add(("epoch", record.Epoch));
            _values.Add(("live_workers", record.LiveWorkers));
            if (record.ComputeSeconds is { } compute) _values.Add(("step_time/compute_seconds", (float)compute));
            if (record.ExchangeSeconds is { } exchange) _values.Add(("step_time/exchange_seconds", (float)exchange));
            if (record.UpdateSeconds is { } update) _values.Add(("step_time/update_seconds", (float)update));
            var time = record.Time ?? _clock.GetUtcNow();
            Write(file => file.WriteScalars(record.Step, time, _values));
        }
    }

    /// <summary>The picture <paramref name="pngPath"/> of step <paramref name="step"/> as an image summary; returns <paramref name="pngPath"/>.</summary>
    public string Picture(long step, string pngPath)
    {
        byte[] png;
        PngHeader header;
        try
        {
            png = File.ReadAllBytes(pngPath);
            header = PngHeader.Read(png, pngPath);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or InvalidDataException)
        {
            lock (_lock)
            {
                if (!_pictureWarned) _warn($"TensorBoard: sample picture {pngPath} not added: {e.Message} (later pictures that fail are skipped without a warning)");
                _pictureWarned = true;
            }
            return pngPath;
        }
        lock (_lock)
        {
            var time = _clock.GetUtcNow();
            Write(file => file.WriteImage(step, time, PictureTag, png, header));
        }
        return pngPath;
    }

    /// <summary>Under the lock: opens the file at the first event, writes and flushes; the first failure ends it.</summary>
    private void Write(Action<TensorBoardEventFile> write)
    {
        if (_failed || _disposed) return;
        try
        {
            _file ??= new TensorBoardEventFile(Directory, _clock.GetUtcNow());
            write(_file);
            _file.Flush();
        }
#pragma warning disable CA1031 // TensorBoard output must never stop training: any failure is reported once and the file ends
        catch (Exception e)
#pragma warning restore CA1031
        {
            _failed = true;
            _warn($"TensorBoard: {_file?.Path ?? Directory} not written ({e.Message}); no more TensorBoard events this run (metrics.jsonl goes on)");
            try
            {
                _file?.Dispose();
            }
#pragma warning disable CA1031 // closing a file that already failed: its second failure says nothing new
            catch (Exception)
#pragma warning restore CA1031
            {
            }
            _file = null;
        }
    }

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed) return;
            _disposed = true;
            try
            {
                _file?.Dispose();
            }
#pragma warning disable CA1031 // the last flush failing at shutdown is reported, not thrown into the host's disposal
            catch (Exception e)
#pragma warning restore CA1031
            {
                if (!_failed) _warn($"TensorBoard: {_file?.Path} not closed cleanly ({e.Message})");
            }
            _file = null;
        }
    }
}
