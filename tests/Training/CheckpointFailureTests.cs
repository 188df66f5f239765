using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Training;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Training;

/// <summary>
/// `coordinator train`'s trainer when the disk refuses a checkpoint: the run survives, the next checkpoint tries again,
/// the final one is retried and only then reported as lost. The failure is a regular file where the run's
/// checkpoints/ folder must go (no root-only tricks): Directory.CreateDirectory fails on it with an IOException,
/// as it would on a full or failing disk.
/// </summary>
public sealed class CheckpointFailureTests() : TempFolderTest("dd-ckpt-fail")
{
    private static Recipe Tiny => Recipes.SwissRoll with { HiddenSize = 16, BatchSize = 8, SyntheticSize = 32, Timesteps = 10, Steps = 6, CheckpointEvery = 2, SampleEvery = 0, Seed = 3 };

    private string Obstruct()
    {
        var run = Path.Combine(Dir, "run");
        Directory.CreateDirectory(run);
        var checkpoints = Path.Combine(run, CheckpointStore.CheckpointsFolderName);
        File.WriteAllText(checkpoints, "a file where the checkpoints folder should be");
        return run;
    }

    private static long[] Steps(string run) => CheckpointStore.List(run).Select(c => c.Step).ToArray();

    [Fact]
    public void AFailedPeriodicCheckpointIsReportedAndTrainingGoesOnToTheNextOne()
    {
        var run = Obstruct();
        using var train = new Dataset(Synthetic2D.SwissRoll(Tiny.SyntheticSize, 2), "swiss roll");
        using var state = TrainingState.Create(Tiny, [2], train.Count, CPU);
        var failed = new List<long>();
        using var trainer = new LocalTrainer(state, train, run)
        {
            OnCheckpointFailed = (step, e) =>
            {
                Assert.IsAssignableFrom<IOException>(e);
                failed.Add(step);
            },
            // The disk recovers after the failed checkpoint at step 2.
            OnStep = p => { if (p.Step == 3) File.Delete(Path.Combine(run, CheckpointStore.CheckpointsFolderName)); },
        };
        trainer.Run(Tiny.Steps);
        Assert.Equal(6, state.StepsDone);
        Assert.Equal([2L], failed);
        Assert.Equal([4L, 6L], Steps(run));
        Assert.Equal(6, trainer.LastCheckpointStep);
        Assert.Equal(Path.Combine(run, "checkpoints", "6"), trainer.LastCheckpoint);
    }

    [Fact]
    public void TheFinalCheckpointIsRetried()
    {
        var run = Obstruct();
        using var train = new Dataset(Synthetic2D.SwissRoll(Tiny.SyntheticSize, 2), "swiss roll");
        using var state = TrainingState.Create(Tiny, [2], train.Count, CPU);
        var failed = new List<long>();
        using var trainer = new LocalTrainer(state, train, run)
        {
            FinalCheckpointRetryPause = TimeSpan.Zero,
            OnCheckpointFailed = (step, _) =>
            {
                failed.Add(step);
                // The final checkpoint's first try fails too; the disk is back for the second.
                if (step == 6) File.Delete(Path.Combine(run, CheckpointStore.CheckpointsFolderName));
            },
        };
        trainer.Run(Tiny.Steps);
        Assert.Equal([2L, 4L, 6L], failed);
        Assert.Equal([6L], Steps(run));
        Assert.Equal(6, trainer.LastCheckpointStep);
    }

    [Fact]
    public void AFinalCheckpointThatCannotBeWrittenIsAnErrorNamingTheStep()
    {
        var run = Obstruct();
        using var train = new Dataset(Synthetic2D.SwissRoll(Tiny.SyntheticSize, 2), "swiss roll");
        using var state = TrainingState.Create(Tiny, [2], train.Count, CPU);
        var failed = new List<long>();
        using var trainer = new LocalTrainer(state, train, run) { FinalCheckpointRetryPause = TimeSpan.Zero, OnCheckpointFailed = (step, _) => failed.Add(step) };
        var e = Assert.Throws<IOException>(() => trainer.Run(Tiny.Steps));
        Assert.Contains("the checkpoint of step 6 could not be written in 3 attempts", e.Message, StringComparison.Ordinal);
        Assert.Contains("this run wrote no checkpoint", e.Message, StringComparison.Ordinal);
        Assert.Equal(6, state.StepsDone);
        Assert.Equal([2L, 4L, 6L, 6L, 6L], failed);
        Assert.Equal(-1, trainer.LastCheckpointStep);
    }

    [Fact]
    public void RetentionKeepsTheLastCheckpointsOfTheRun()
    {
        var run = Path.Combine(Dir, "run");
        using var train = new Dataset(Synthetic2D.SwissRoll(Tiny.SyntheticSize, 2), "swiss roll");
        using var state = TrainingState.Create(Tiny with { CheckpointEvery = 1, Steps = 7 }, [2], train.Count, CPU);
        var deleted = new List<string>();
        using (var trainer = new LocalTrainer(state, train, run) { Retention = new CheckpointRetention(keepLast: 2, keepEvery: 3), OnCheckpoint = s => deleted.AddRange(s.Deleted) })
            trainer.Run(7);
        Assert.Equal([3L, 6L, 7L], Steps(run));
        Assert.Equal(new long[] { 1, 2, 4, 5 }.Select(s => Path.Combine(run, "checkpoints", s.ToString(System.Globalization.CultureInfo.InvariantCulture))), deleted);
    }

    /// <summary>
    /// A run whose latest checkpoint was damaged resumes from the one before and, on reaching the damaged step again,
    /// writes it anew (the damaged folder moved aside) instead of skipping it because a folder of that name exists.
    /// </summary>
    [Fact]
    public void ReachingTheStepOfADamagedCheckpointAgainWritesIt()
    {
        var run = Path.Combine(Dir, "run");
        using var train = new Dataset(Synthetic2D.SwissRoll(Tiny.SyntheticSize, 2), "swiss roll");
        using (var first = TrainingState.Create(Tiny, [2], train.Count, CPU))
        using (var trainer = new LocalTrainer(first, train, run))
            trainer.Run(6);
        Assert.Equal([2L, 4L, 6L], Steps(run));
        var model = Path.Combine(run, "checkpoints", "6", "model.safetensors");
        var bytes = File.ReadAllBytes(model);
        bytes[^1] ^= 0x40;
        File.WriteAllBytes(model, bytes);

        var older = CheckpointStore.Load(Path.Combine(run, "checkpoints", "4"));
        using var resumed = TrainingState.FromCheckpoint(older, [2], train.Count, CPU);
        older.DisposeTensors();
        var saved = new List<SavedCheckpoint>();
        using (var trainer = new LocalTrainer(resumed, train, run) { OnCheckpoint = saved.Add })
            trainer.Run(6);

        var last = Assert.Single(saved);
        Assert.Equal(6, last.Step);
        Assert.Contains("checksum mismatch", Assert.Single(last.SetAside).Reason, StringComparison.Ordinal);
        Assert.Equal(6, CheckpointStore.Verify(Path.Combine(run, "checkpoints", "6")));
        Assert.Single(Directory.GetFileSystemEntries(Path.Combine(run, "checkpoints"), ".broken-6-*"));
    }

    /// <summary>A trainer on a resumed state with nothing left to train does not write (or fail on) the checkpoint it came from.</summary>
    [Fact]
    public void ResumingAtTheTargetStepWritesNothing()
    {
        var run = Path.Combine(Dir, "run");
        using var train = new Dataset(Synthetic2D.SwissRoll(Tiny.SyntheticSize, 2), "swiss roll");
        using (var first = TrainingState.Create(Tiny, [2], train.Count, CPU))
        using (var trainer = new LocalTrainer(first, train, run))
            trainer.Run(4);
        var checkpoint = CheckpointStore.Load(run);
        using var resumed = TrainingState.FromCheckpoint(checkpoint, [2], train.Count, CPU);
        checkpoint.DisposeTensors();
        var failed = new List<long>();
        var saved = new List<SavedCheckpoint>();
        using (var trainer = new LocalTrainer(resumed, train, run) { OnCheckpoint = saved.Add, OnCheckpointFailed = (s, _) => failed.Add(s) })
            trainer.Run(4);
        Assert.Empty(saved);
        Assert.Empty(failed);
        Assert.Equal([2L, 4L], Steps(run));
    }
}
