using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Model.Checkpoints;
using Microsoft.Extensions.Logging;

namespace DistDiffusion.Tests.Cli;

/// <summary>
/// How `train`, `serve` and `run` open a run folder: one set of rules (RunFolder) for all of them. A damaged latest
/// checkpoint is skipped with a warning naming it and why, instead of stopping a restart (a Kubernetes coordinator would
/// crash-loop); a checkpoint folder given to --resume continues its run; on resume --recipe, --set and --seed may only
/// restate the run's recipe, and an older checkpoint of a run that has newer ones is refused.
/// </summary>
[Collection(CliCollection.Name)]
public sealed class RunOpeningTests() : TempFolderTest("dd-open")
{
    private static readonly string[] Small = ["--set", "hidden-size=8", "--set", "timesteps=5", "--set", "sample-every=0", "--set", "checkpoint-every=2", "--threads", "1"];

    /// <summary>A 4-step swiss-roll run with checkpoints at steps 2 and 4.</summary>
    private string TrainedRun()
    {
        var run = Path.Combine(Dir, "run");
        var (code, _, err) = CliHarness.Run(["train", "--recipe", "swissroll", "--out", run, "--steps", "4", .. Small]);
        Assert.True(code == 0, err);
        Assert.Equal([2L, 4L], CheckpointStore.List(run).Select(c => c.Step));
        return run;
    }

    private static string Checkpoint(string run, long step) => Path.Combine(run, "checkpoints", step.ToString(System.Globalization.CultureInfo.InvariantCulture));

    private static void FlipAByte(string file)
    {
        var bytes = File.ReadAllBytes(file);
        bytes[^1] ^= 0x20;
        File.WriteAllBytes(file, bytes);
    }

    /// <summary>A logger that keeps what it is given (RunSetup's warnings).</summary>
    private sealed class ListLogger : ILogger
    {
        public List<(LogLevel Level, string Message)> Lines { get; } = [];
        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;
        public bool IsEnabled(LogLevel logLevel) => true;
        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
            Lines.Add((logLevel, formatter(state, exception)));
    }

    private static CoordinatorOptions Serve(string? resume = null, string? recipe = null) => new() { Resume = resume, Recipe = recipe, Device = "cpu", Threads = 1 };

    [Fact]
    public void TrainResumesPastADamagedLatestCheckpointWithAWarning()
    {
        var run = TrainedRun();
        FlipAByte(Path.Combine(Checkpoint(run, 4), "model.safetensors"));
        var (code, output, err) = CliHarness.Run("train", "--resume", run, "--steps", "6", "--threads", "1");
        Assert.True(code == 0, err);
        Assert.Contains($"warning: checkpoint {Checkpoint(run, 4)} cannot be read, skipped:", err, StringComparison.Ordinal);
        Assert.Contains("checksum mismatch", err, StringComparison.Ordinal);
        Assert.Contains("from step 2 to 6", err, StringComparison.Ordinal);
        Assert.Contains("to step 6", output, StringComparison.Ordinal);
        // Step 4 was trained again and saved over the damaged folder, which was moved aside.
        Assert.Equal([2L, 4L, 6L], CheckpointStore.List(run).Select(c => c.Step));
        Assert.Equal(4, CheckpointStore.Verify(Checkpoint(run, 4)));
        Assert.Single(Directory.GetFileSystemEntries(Path.Combine(run, "checkpoints"), ".broken-4-*"));
    }

    [Theory]
    [InlineData("checksum")]
    [InlineData("truncated")]
    [InlineData("bad JSON")]
    public void ServeResumesPastADamagedLatestCheckpointWithAWarning(string damage)
    {
        var run = TrainedRun();
        var latest = Checkpoint(run, 4);
        switch (damage)
        {
            case "checksum": FlipAByte(Path.Combine(latest, "ema.safetensors")); break;
            case "truncated": File.WriteAllBytes(Path.Combine(latest, "optimizer.safetensors"), File.ReadAllBytes(Path.Combine(latest, "optimizer.safetensors"))[..100]); break;
            default: File.WriteAllText(Path.Combine(latest, "checkpoint.json"), "{ \"format_version\": "); break;
        }
        var log = new ListLogger();
        using var setup = RunSetup.Create(Serve(resume: run, recipe: "swissroll"), log);
        Assert.Equal(2, setup.State.StepsDone);
        Assert.Equal(Checkpoint(run, 2), setup.ResumedFrom);
        Assert.Equal((Checkpoint(run, 2), 2L), setup.LastCheckpoint);
        var warning = Assert.Single(log.Lines, l => l.Level == LogLevel.Warning).Message;
        Assert.Contains(latest, warning, StringComparison.Ordinal);
        Assert.Contains(damage switch { "checksum" => "checksum mismatch", "truncated" => "truncated", _ => "not valid JSON" }, warning, StringComparison.Ordinal);
    }

    [Fact]
    public void EveryCheckpointUnreadableIsAnErrorListingEachReasonNotANewRun()
    {
        var run = TrainedRun();
        FlipAByte(Path.Combine(Checkpoint(run, 4), "model.safetensors"));
        File.Delete(Path.Combine(Checkpoint(run, 2), "ema.safetensors"));
        var e = Assert.Throws<CheckpointException>(() => RunSetup.Create(Serve(resume: run, recipe: "swissroll"), new ListLogger()));
        Assert.Contains("none of its 2 checkpoints can be read", e.Message, StringComparison.Ordinal);
        Assert.Contains("checksum mismatch", e.Message, StringComparison.Ordinal);
        Assert.Contains("missing file", e.Message, StringComparison.Ordinal);
        var (code, _, err) = CliHarness.Run("train", "--resume", run, "--threads", "1");
        Assert.Equal(1, code);
        Assert.Contains("none of its 2 checkpoints can be read", err, StringComparison.Ordinal);
    }

    /// <summary>`--resume RUN/checkpoints/N --recipe X` started a new run from step 0 inside the checkpoint folder.</summary>
    [Fact]
    public void ServeResumingACheckpointFolderContinuesItsRun()
    {
        var run = TrainedRun();
        using (var setup = RunSetup.Create(Serve(resume: Checkpoint(run, 4), recipe: "swissroll"), new ListLogger()))
        {
            Assert.Equal(4, setup.State.StepsDone);
            Assert.Equal(run, setup.RunDir);
            Assert.Equal(Checkpoint(run, 4), setup.ResumedFrom);
        }
        Assert.False(File.Exists(Path.Combine(Checkpoint(run, 4), "recipe.json")), "nothing is written into a checkpoint folder");
        using (var setup = RunSetup.Create(Serve(resume: Path.Combine(Checkpoint(run, 4), "checkpoint.json")), new ListLogger()))
            Assert.Equal(4, setup.State.StepsDone);
    }

    /// <summary>Empty or partial step folders and leftover temporary folders are ignored at start-up.</summary>
    [Fact]
    public void LeftoversInTheCheckpointsFolderAreIgnoredAtStartUp()
    {
        var run = TrainedRun();
        Directory.CreateDirectory(Checkpoint(run, 300));
        var partial = Checkpoint(run, 200);
        Directory.CreateDirectory(partial);
        File.Copy(Path.Combine(Checkpoint(run, 4), "model.safetensors"), Path.Combine(partial, "model.safetensors"));
        Directory.CreateDirectory(Path.Combine(run, "checkpoints", ".tmp-6-" + Guid.NewGuid().ToString("N")));
        var log = new ListLogger();
        using var setup = RunSetup.Create(Serve(resume: run), log);
        Assert.Equal(4, setup.State.StepsDone);
        Assert.DoesNotContain(log.Lines, l => l.Level >= LogLevel.Warning);
    }

    public static TheoryData<string, string[], string> Refusals => new()
    {
        { "train", ["--set", "learning-rate=0.5"], "--set learning-rate=0.5: would change learning-rate from 0.002 to 0.5 of the run in" },
        { "serve", ["--set", "learning-rate=0.5"], "--set learning-rate=0.5: would change learning-rate from 0.002 to 0.5 of the run in" },
        { "train", ["--seed", "99"], "--seed 99: " },
        { "serve", ["--seed", "99"], "--seed 99: " },
        { "train", ["--recipe", "swissroll-ddpm"], "--recipe swissroll-ddpm: " },
        { "serve", ["--recipe", "swissroll-ddpm"], "--recipe swissroll-ddpm: " },
        { "train", ["OLDER"], "step 2 is not the latest checkpoint of" },
        { "serve", ["OLDER"], "step 2 is not the latest checkpoint of" },
    };

    /// <summary>`serve` ignored --set and --seed on resume, and both verbs followed different rules; now the same refusals.</summary>
    [Theory]
    [MemberData(nameof(Refusals))]
    public void TrainAndServeRefuseTheSameThingsOnResume(string verb, string[] extra, string message)
    {
        var run = TrainedRun();
        var resume = extra is ["OLDER"] ? Checkpoint(run, 2) : run;
        string[] flags = extra is ["OLDER"] ? [] : extra;
        string[] serving = verb == "serve" ? ["--allow-unauthenticated", "--listen", "http://127.0.0.1:0", "--device", "cpu"] : ["--threads", "1"];
        var (code, _, err) = CliHarness.Run([verb, "--resume", resume, .. flags, .. serving]);
        Assert.True(code == 2, err);
        Assert.Contains(message, err, StringComparison.Ordinal);
        if (extra is not ["OLDER"]) Assert.Contains("a resumed run keeps the recipe stored in its checkpoint", err, StringComparison.Ordinal);
        Assert.Equal([2L, 4L], CheckpointStore.List(run).Select(c => c.Step));
    }

    /// <summary>
    /// What a Kubernetes coordinator passes on every start (--resume DIR with the ConfigMap's recipe and overrides) restates
    /// the run: accepted, for train as for serve. --set steps=N and --steps move the target.
    /// </summary>
    [Fact]
    public void RestatingTheRunsOwnRecipeOnResumeIsAccepted()
    {
        var run = TrainedRun();
        var options = Serve(resume: run, recipe: "swissroll");
        options.Set = ["hidden-size=8", "timesteps=5", "steps=9"];
        using (var setup = RunSetup.Create(options, new ListLogger()))
        {
            Assert.Equal(4, setup.State.StepsDone);
            Assert.Equal(9, setup.TargetStep);
        }
        var stored = CheckpointStore.Load(run);
        stored.DisposeTensors();
        options.Steps = 7;
        options.Seed = stored.Seed;
        using (var setup = RunSetup.Create(options, new ListLogger()))
            Assert.Equal(7, setup.TargetStep);

        var (code, output, err) = CliHarness.Run(["train", "--resume", run, "--recipe", "swissroll", .. Small, "--steps", "6"]);
        Assert.True(code == 0, err);
        Assert.Contains("to step 6", output, StringComparison.Ordinal);
    }

    [Fact]
    public void AResumeFolderWithoutCheckpointsStartsTheRunOnlyWithARecipe()
    {
        var fresh = Path.Combine(Dir, "fresh");
        var (code, _, err) = CliHarness.Run("train", "--resume", fresh, "--threads", "1");
        Assert.Equal(2, code);
        Assert.Contains($"--resume {fresh}: no checkpoint there yet (no such folder); give --recipe NAME to start the run in that folder", err, StringComparison.Ordinal);
        (code, _, err) = CliHarness.Run(["train", "--resume", fresh, "--recipe", "swissroll", "--steps", "2", .. Small]);
        Assert.True(code == 0, err);
        Assert.Equal([2L], CheckpointStore.List(fresh).Select(c => c.Step));
    }

    [Theory]
    [InlineData("train", "--keep-checkpoints", "0", "--keep-checkpoints 0: expected a count >= 1")]
    [InlineData("train", "--keep-every", "-4", "--keep-every -4: expected a step interval >= 1")]
    [InlineData("serve", "--keep-checkpoints", "-1", "--keep-checkpoints -1: expected a count >= 1")]
    [InlineData("serve", "--keep-every", "0", "--keep-every 0: expected a step interval >= 1")]
    [InlineData("run", "--keep-checkpoints", "0", "--keep-checkpoints 0: expected a count >= 1")]
    [InlineData("run", "--keep-every", "0", "--keep-every 0: expected a step interval >= 1")]
    public void RetentionFlagsOutOfRangeAreUsageErrors(string verb, string flag, string value, string message)
    {
        string[] rest = verb switch
        {
            "serve" => ["--allow-unauthenticated", "--listen", "http://127.0.0.1:0"],
            "run" => ["--workers", "1"],
            _ => [],
        };
        var (code, _, err) = CliHarness.Run([verb, "--recipe", "swissroll", "--out", Path.Combine(Dir, "never"), flag, value, .. rest]);
        Assert.Equal(2, code);
        Assert.StartsWith("error: " + message, Assert.Single(err.Trim().Split('\n')), StringComparison.Ordinal);
        Assert.False(Directory.Exists(Path.Combine(Dir, "never")));
        // The coordinator's configuration (appsettings.json, DISTDIFFUSION_Coordinator__*) is checked the same way.
        var key = flag == "--keep-every" ? "KeepEvery" : "KeepCheckpoints";
        var e = Assert.Throws<UsageException>(() => ServeCommand.Configure(new Dictionary<string, string?> { ["Coordinator:Recipe"] = "swissroll", [$"Coordinator:{key}"] = value }));
        Assert.StartsWith(message, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void TrainKeepsTheLastCheckpointsAndEveryKthStep()
    {
        var run = Path.Combine(Dir, "kept");
        var (code, _, err) = CliHarness.Run(["train", "--recipe", "swissroll", "--out", run, "--steps", "10", .. Small, "--keep-checkpoints", "2", "--keep-every", "4"]);
        Assert.True(code == 0, err);
        Assert.Equal([4L, 8L, 10L], CheckpointStore.List(run).Select(c => c.Step));
        Assert.Contains($"deleted checkpoint {Checkpoint(run, 2)}", err, StringComparison.Ordinal);
        Assert.Contains($"deleted checkpoint {Checkpoint(run, 6)}", err, StringComparison.Ordinal);
        // The default keeps the last 5.
        run = Path.Combine(Dir, "default");
        (code, _, err) = CliHarness.Run(["train", "--recipe", "swissroll", "--out", run, "--steps", "14", .. Small]);
        Assert.True(code == 0, err);
        Assert.Equal([6L, 8L, 10L, 12L, 14L], CheckpointStore.List(run).Select(c => c.Step));
    }

    /// <summary>
    /// `train` on a disk that refuses every checkpoint (a regular file where RUN/checkpoints must go): each periodic failure
    /// is an error line and training goes on to the end; the final checkpoint is tried 3 times, then exit 1 names the step.
    /// </summary>
    [Fact]
    public void TrainGoesOnWhenACheckpointFailsAndExitsOneWhenTheLastCannotBeWritten()
    {
        var run = Path.Combine(Dir, "full");
        Directory.CreateDirectory(run);
        File.WriteAllText(Path.Combine(run, "checkpoints"), "in the way");
        var (code, _, err) = CliHarness.Run(["train", "--recipe", "swissroll", "--out", run, "--steps", "4", .. Small]);
        Assert.Equal(1, code);
        Assert.Contains("error: the checkpoint of step 2 was not written:", err, StringComparison.Ordinal);
        Assert.Contains("training goes on and the next checkpoint tries again", err, StringComparison.Ordinal);
        Assert.Contains("error: the checkpoint of step 4 could not be written in 3 attempts", err, StringComparison.Ordinal);
        Assert.Contains("this run wrote no checkpoint", err, StringComparison.Ordinal);
    }
}
