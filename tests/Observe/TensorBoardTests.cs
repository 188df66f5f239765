using System.Buffers.Binary;
using System.Text;
using DistDiffusion.Coordinator.Observe;
using DistDiffusion.Model.Imaging;
using DistDiffusion.Tests.Distributed;

namespace DistDiffusion.Tests.Observe;

/// <summary>
/// Issue 30: RUN/tensorboard/events.out.tfevents.* read back with <see cref="EventFileReader"/> (which shares no code
/// with the writer) and compared with metrics.jsonl and the sample pictures of the same run.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class TensorBoardTests() : TempFolderTest("dd-tensorboard")
{
    private static string[] Sets(params string[] more) => [.. Cluster.Sets().Concat(more).SelectMany(s => new[] { "--set", s })];

    private static readonly string[] RecordTags = ["loss", "learning_rate", "grad_norm", "samples_per_second", "epoch", "live_workers"];
    private static readonly string[] SplitTags = ["step_time/compute_seconds", "step_time/exchange_seconds", "step_time/update_seconds"];

    [Fact]
    public void Crc32CMatchesTheStandardCheckValueAndTheReadersOwn()
    {
        // The check value of CRC-32C (iSCSI, RFC 3720) over the nine ASCII digits.
        Assert.Equal(0xE3069283u, EventFileReader.Crc32C("123456789"u8));
        Assert.Equal(0xE3069283u, TensorBoardEventFile.Crc32C("123456789"u8));
        Assert.Equal(0u, TensorBoardEventFile.Crc32C([]));
        // RFC 3720 B.4: 32 bytes of zeros, of 0xFF.
        Assert.Equal(0x8A9136AAu, TensorBoardEventFile.Crc32C(new byte[32]));
        Assert.Equal(0x62A8AB43u, TensorBoardEventFile.Crc32C(Enumerable.Repeat((byte)0xFF, 32).ToArray()));
        Assert.Equal(0x46DD794Eu, TensorBoardEventFile.Crc32C(Enumerable.Range(0, 32).Select(i => (byte)i).ToArray()));
        Assert.Equal(0x46DD794Eu, EventFileReader.Crc32C(Enumerable.Range(0, 32).Select(i => (byte)i).ToArray()));
        // Every length around the writer's 8-byte words and tails.
        var random = new Random(5);
        for (var n = 0; n < 70; n++)
        {
            var data = new byte[n];
            random.NextBytes(data);
            Assert.Equal(EventFileReader.Crc32C(data), TensorBoardEventFile.Crc32C(data));
            Assert.Equal(EventFileReader.Masked(EventFileReader.Crc32C(data)), TensorBoardEventFile.MaskedCrc(data));
        }
    }

    [Fact(Timeout = 240_000)]
    public async Task TrainWritesMetricsJsonlAndItsPicturesAsEvents()
    {
        await Task.Yield();
        var runDir = Path.Combine(Dir, "train");
        var before = DateTimeOffset.UtcNow;
        var (code, _, err) = CliHarness.Run(["train", "--recipe", "swissroll", "--seed", "11", "--steps", "10", "--out", runDir, "--log-every", "2", "--threads", "1", .. Sets("sample-every=5")]);
        Assert.True(code == 0, err);
        var file = Assert.Single(EventFiles(runDir));
        Assert.False(IsOpenHere(file), $"{file} is still open after train returned");
        var events = EventFileReader.Read(file);
        Assert.Equal(TensorBoardEventFile.FileVersion, events[0].FileVersion);
        Assert.Empty(events[0].Values);
        Assert.InRange(events[0].WallTime, TensorBoardEventFile.WallTime(before) - 1, TensorBoardEventFile.WallTime(DateTimeOffset.UtcNow) + 1);

        var records = MetricsJournal.Read(Path.Combine(runDir, MetricsJournal.FileName));
        Assert.Equal([2L, 4, 6, 8, 10], records.Select(r => r.Step));
        AssertScalarsMatch(records, events, distributed: false);
        AssertPicturesMatch(runDir, events, [5, 10]);

        // A resumed run adds a file of its own, with the records it appended.
        (code, _, err) = CliHarness.Run(["train", "--resume", runDir, "--steps", "14", "--log-every", "2", "--threads", "1"]);
        Assert.True(code == 0, err);
        var files = EventFiles(runDir);
        Assert.Equal(2, files.Count);
        Assert.Equal(events, EventFileReader.Read(file), EventComparer.Instance);
        var resumed = EventFileReader.Read(files.Single(f => f != file));
        AssertScalarsMatch(MetricsJournal.Read(Path.Combine(runDir, MetricsJournal.FileName)).Skip(records.Count).ToList(), resumed, distributed: false);
    }

    [Fact(Timeout = 240_000)]
    public async Task RunWritesTheStepSplitAndTheWorkersPictures()
    {
        await Task.Yield();
        var runDir = Path.Combine(Dir, "run");
        var (code, _, err) = CliHarness.Run(["run", "--workers", "1", "--worker-threads", "1", "--recipe", "swissroll", "--seed", "11", "--steps", "8", "--out", runDir, "--log-every", "2", .. Sets("sample-every=4")]);
        Assert.True(code == 0, err);
        var file = Assert.Single(EventFiles(runDir));
        Assert.False(IsOpenHere(file), $"{file} is still open after run returned");
        var events = EventFileReader.Read(file);
        Assert.Equal(TensorBoardEventFile.FileVersion, events[0].FileVersion);
        var records = MetricsJournal.Read(Path.Combine(runDir, MetricsJournal.FileName));
        Assert.Equal([2L, 4, 6, 8], records.Select(r => r.Step));
        AssertScalarsMatch(records, events, distributed: true);
        AssertPicturesMatch(runDir, events, [4, 8]);
    }

    [Fact]
    public void AFailingFolderWarnsOnceAndTheJournalGoesOn()
    {
        var runDir = Path.Combine(Dir, "blocked");
        Directory.CreateDirectory(runDir);
        File.WriteAllText(Path.Combine(runDir, TensorBoardSink.FolderName), "a file where the folder would go");
        var warnings = new List<string>();
        using var sink = new TensorBoardSink(runDir, warnings.Add);
        var journal = new MetricsJournal(runDir, sink);
        for (var step = 1; step <= 5; step++) journal.Append(new StepRecord(step, 0, 1.0 / step, 2, 1e-3, 100, 0));
        sink.Picture(5, Picture("p.png"));
        Assert.Equal(5, MetricsJournal.Read(journal.Path).Count);
        var warning = Assert.Single(warnings);
        Assert.Contains(sink.Directory, warning, StringComparison.Ordinal);
        Assert.Contains("metrics.jsonl goes on", warning, StringComparison.Ordinal);
        Assert.Null(sink.EventFilePath);
    }

    [Fact]
    public void APictureThatIsNotAPngIsSkippedWithOneWarning()
    {
        var warnings = new List<string>();
        using var sink = new TensorBoardSink(Dir, warnings.Add);
        var notPng = Path.Combine(Dir, "not.png");
        File.WriteAllText(notPng, "GIF89a, not a PNG at all, but long enough to have a header");
        sink.Picture(1, notPng);
        sink.Picture(2, Path.Combine(Dir, "missing.png"));
        sink.Record(new StepRecord(3, 0, 0.5, 1, 1e-3, 10, 0, Time: DateTimeOffset.UtcNow));
        var warning = Assert.Single(warnings);
        Assert.Contains(notPng, warning, StringComparison.Ordinal);
        Assert.Contains("not a PNG", warning, StringComparison.Ordinal);
        var events = EventFileReader.Read(sink.EventFilePath!);
        Assert.Equal(2, events.Count);
        Assert.Equal(3, events[1].Step);
    }

    /// <summary>Thousands of records and some pictures: the managed heap stays where it was, the file grows by whole records.</summary>
    [Fact]
    public void MemoryStaysFlatOverThousandsOfRecords()
    {
        var warnings = new List<string>();
        var picture = Picture("grid.png");
        using var sink = new TensorBoardSink(Dir, warnings.Add);
        var start = DateTimeOffset.UnixEpoch.AddDays(20_000);
        void Steps(int from, int to)
        {
            for (var step = from; step <= to; step++)
            {
                sink.Record(new StepRecord(step, step / 10, 1.0 / step, 0.5, 2e-4, 1234.5, 2, 0.01, 0.002, 0.003, start.AddSeconds(step)));
                if (step % 2_500 == 0) sink.Picture(step, picture);
            }
        }
        Steps(1, 2_000);
        var heap = GC.GetTotalMemory(forceFullCollection: true);
        Steps(2_001, 20_000);
        var grown = GC.GetTotalMemory(forceFullCollection: true) - heap;
        Assert.True(grown < 256 * 1024, $"the managed heap grew {grown} bytes over 18,000 records");
        Assert.Empty(warnings);
        var events = EventFileReader.Read(sink.EventFilePath!);
        Assert.Equal(1 + 20_000 + 8, events.Count);
        Assert.Equal(Enumerable.Range(1, 20_000).Select(s => (long)s), events.Where(e => e.Values.Any(v => v.Scalar is not null)).Select(e => e.Step));
        Assert.Equal(TensorBoardEventFile.WallTime(start.AddSeconds(20_000)), events.Last(e => e.Values[0].Scalar is not null).WallTime);
    }

    private string Picture(string name)
    {
        var path = Path.Combine(Dir, name);
        LinePlot.Save([(0, 1), (1, 0.5), (2, 0.25)], path, "test", 96, 64);
        return path;
    }

    /// <summary>RUN/tensorboard's files, which must all be event files named as TensorBoard looks for them.</summary>
    private static List<string> EventFiles(string runDir)
    {
        var files = Directory.GetFiles(Path.Combine(runDir, TensorBoardSink.FolderName)).Order(StringComparer.Ordinal).ToList();
        Assert.All(files, f => Assert.StartsWith("events.out.tfevents.", Path.GetFileName(f), StringComparison.Ordinal));
        return files;
    }

    /// <summary>Whether this process holds a descriptor of <paramref name="path"/> (Linux: /proc/self/fd).</summary>
    private static bool IsOpenHere(string path)
    {
        if (!Directory.Exists("/proc/self/fd")) return false;
        var full = Path.GetFullPath(path);
        foreach (var fd in Directory.GetFiles("/proc/self/fd"))
        {
            try
            {
                if (new FileInfo(fd).LinkTarget == full) return true;
            }
            catch (IOException)
            {
                // closed while listing
            }
        }
        return false;
    }

    /// <summary>One scalar event per metrics.jsonl line, at its step and time, one value per key, equal as float32.</summary>
    private static void AssertScalarsMatch(IReadOnlyList<StepRecord> records, List<EventRecord> events, bool distributed)
    {
        var scalars = events.Where(e => e.Values.Any(v => v.Scalar is not null)).ToList();
        Assert.Equal(records.Count, scalars.Count);
        foreach (var (r, e) in records.Zip(scalars))
        {
            Assert.Equal(r.Step, e.Step);
            var time = r.Time ?? throw new Xunit.Sdk.XunitException($"step {r.Step}: no time in metrics.jsonl");
            Assert.Equal((time - DateTimeOffset.UnixEpoch).TotalSeconds, e.WallTime, 1e-6);
            var values = e.Values.ToDictionary(v => v.Tag, v => v.Scalar!.Value);
            Assert.Equal(distributed ? RecordTags.Concat(SplitTags).Order() : RecordTags.Order(), values.Keys.Order());
            Assert.Equal((float)r.Loss, values["loss"]);
            Assert.Equal((float)r.LearningRate, values["learning_rate"]);
            Assert.Equal((float)r.GradNorm, values["grad_norm"]);
            Assert.Equal((float)r.SamplesPerSecond, values["samples_per_second"]);
            Assert.Equal((float)r.Epoch, values["epoch"]);
            Assert.Equal((float)r.LiveWorkers, values["live_workers"]);
            Assert.True(r.Loss > 0 && r.GradNorm > 0 && r.LearningRate > 0 && r.SamplesPerSecond > 0, $"step {r.Step}: a value of 0 would compare equal by accident");
            if (!distributed) continue;
            Assert.Equal((float)r.ComputeSeconds!.Value, values["step_time/compute_seconds"]);
            Assert.Equal((float)r.ExchangeSeconds!.Value, values["step_time/exchange_seconds"]);
            Assert.Equal((float)r.UpdateSeconds!.Value, values["step_time/update_seconds"]);
            Assert.Equal(1, r.LiveWorkers);
        }
    }

    /// <summary>One image event per picture of the run, at its step, holding the PNG's bytes and its IHDR size.</summary>
    private static void AssertPicturesMatch(string runDir, List<EventRecord> events, long[] steps)
    {
        var images = events.Where(e => e.Values.Any(v => v.Image is not null)).ToList();
        Assert.Equal(steps, images.Select(e => e.Step));
        foreach (var e in images)
        {
            var value = Assert.Single(e.Values);
            Assert.Equal(TensorBoardSink.PictureTag, value.Tag);
            var png = File.ReadAllBytes(Path.Combine(runDir, "samples", $"step-{e.Step:D7}.png"));
            Assert.True(png.AsSpan().SequenceEqual(value.Image!.Encoded), $"step {e.Step}: the image summary is not the PNG on disk");
            Assert.Equal("IHDR", Encoding.ASCII.GetString(png, 12, 4));
            Assert.Equal(BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(16)), value.Image.Width);
            Assert.Equal(BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(20)), value.Image.Height);
            Assert.Equal(png[25] switch { 0 => 1, 4 => 2, 2 or 3 => 3, 6 => 4, _ => -1 }, value.Image.Colorspace);
        }
    }

    private sealed class EventComparer : IEqualityComparer<EventRecord>
    {
        public static readonly EventComparer Instance = new();

        public bool Equals(EventRecord? x, EventRecord? y) =>
            x is not null && y is not null && x.WallTime == y.WallTime && x.Step == y.Step && x.FileVersion == y.FileVersion
            && x.Values.Select(v => (v.Tag, v.Scalar, v.Image?.Width, v.Image?.Height)).SequenceEqual(y.Values.Select(v => (v.Tag, v.Scalar, v.Image?.Width, v.Image?.Height)));

        public int GetHashCode(EventRecord obj) => HashCode.Combine(obj.Step, obj.WallTime);
    }
}
