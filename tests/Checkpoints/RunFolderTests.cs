using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Checkpoints;

/// <summary>RunFolder's rules that the verbs' tests do not reach: branching with --out, and where a resumed run's last checkpoint is.</summary>
public sealed class RunFolderTests : IDisposable
{
    private readonly TempFolder _dir = new("distdiffusion-ckpt");

    public void Dispose() => _dir.Dispose();

    private static CheckpointData Data(long step)
    {
        var recipe = Recipes.Get("swissroll") with { Steps = 10 };
        return new CheckpointData(recipe, step, 0, 0, recipe.Seed,
            new Dictionary<string, Tensor> { ["w"] = torch.ones(2) },
            new Dictionary<string, Tensor>(),
            new Dictionary<string, Tensor> { ["exp_avg.w"] = torch.zeros(2) },
            new Dictionary<string, string> { [CheckpointStore.OptimizerStepKey] = step.ToString(System.Globalization.CultureInfo.InvariantCulture) });
    }

    private string RunWith(string name, params long[] steps)
    {
        var run = _dir.File(name);
        foreach (var s in steps)
        {
            var d = Data(s);
            CheckpointStore.Save(run, d);
            d.DisposeTensors();
        }
        return run;
    }

    [Fact]
    public void BranchingOffAnOlderCheckpointGoesToTheNewFolderOnly()
    {
        var run = RunWith("run", 2, 4);
        var older = Path.Combine(run, "checkpoints", "2");
        var branch = _dir.File("branch");
        using (var opened = RunFolder.Open(new RunRequest { Resume = older, Out = branch }))
        {
            Assert.Equal(branch, opened.RunDir);
            Assert.Equal(2, opened.Checkpoint!.Step);
            Assert.Null(opened.LastCheckpointInRun);   // the branch has written nothing yet
        }
        var taken = RunWith("taken", 6);
        var e = Assert.Throws<ArgumentException>(() => RunFolder.Open(new RunRequest { Resume = older, Out = taken }));
        Assert.Contains($"--out {taken}: already holds a run with checkpoints", e.Message, StringComparison.Ordinal);
        using var same = RunFolder.Open(new RunRequest { Resume = run, Out = run });
        Assert.Equal((Path.Combine(run, "checkpoints", "4"), 4L), same.LastCheckpointInRun);

        // A checkpoint copied out of its run has no run to continue in unless --out names one.
        var copy = _dir.File("copy");
        Directory.CreateDirectory(copy);
        foreach (var f in Directory.GetFiles(Path.Combine(run, "checkpoints", "4"))) File.Copy(f, Path.Combine(copy, Path.GetFileName(f)));
        Assert.Contains("a checkpoint folder outside a run's checkpoints/ folder; give --out DIR",
            Assert.Throws<ArgumentException>(() => RunFolder.Open(new RunRequest { Resume = copy })).Message, StringComparison.Ordinal);
        using var copied = RunFolder.Open(new RunRequest { Resume = copy, Out = _dir.File("continued") });
        Assert.Equal(4, copied.Checkpoint!.Step);
    }

    [Fact]
    public void ANewRunNeedsRecipeAndAFolderWithoutCheckpoints()
    {
        var run = RunWith("run", 2);
        Assert.Contains("--recipe NAME is required", Assert.Throws<ArgumentException>(() => RunFolder.Open(new RunRequest { Out = run })).Message, StringComparison.Ordinal);
        Assert.Contains("--out DIR is required", Assert.Throws<ArgumentException>(() => RunFolder.Open(new RunRequest { Recipe = "swissroll" })).Message, StringComparison.Ordinal);
        Assert.Contains("already holds a run with checkpoints; use --resume", Assert.Throws<ArgumentException>(() => RunFolder.Open(new RunRequest { Recipe = "swissroll", Out = run })).Message, StringComparison.Ordinal);
        Assert.Contains("--steps -1: expected a count >= 0", Assert.Throws<ArgumentException>(() => RunFolder.Open(new RunRequest { Recipe = "swissroll", Out = _dir.File("new"), Steps = -1 })).Message, StringComparison.Ordinal);
        using var fresh = RunFolder.Open(new RunRequest { Recipe = "swissroll", Out = _dir.File("new"), Set = ["hidden-size=16"], Seed = 5, Steps = 3 });
        Assert.Null(fresh.Checkpoint);
        Assert.Equal((16, 5L, 3), (fresh.Recipe.HiddenSize, fresh.Recipe.Seed, fresh.Recipe.Steps));
    }

    [Fact]
    public void LoadNewestReadableSkipsDamagedCheckpointsNewestFirst()
    {
        var run = RunWith("run", 1, 2, 3);
        File.Delete(Path.Combine(run, "checkpoints", "3", "model.safetensors"));
        File.WriteAllText(Path.Combine(run, "checkpoints", "2", "checkpoint.json"), "nope");
        var (data, folder, skipped) = RunFolder.LoadNewestReadable(run);
        data.DisposeTensors();
        Assert.Equal(Path.Combine(run, "checkpoints", "1"), folder);
        Assert.Equal(new[] { "3", "2" }, skipped.Select(s => Path.GetFileName(s.Folder)));
        Assert.Contains("missing file", skipped[0].Reason, StringComparison.Ordinal);
        Assert.Contains("not valid JSON", skipped[1].Reason, StringComparison.Ordinal);
        // A checkpoint folder given by its path is that checkpoint, damaged or not.
        Assert.Throws<CheckpointException>(() => RunFolder.LoadNewestReadable(Path.Combine(run, "checkpoints", "3")));
    }
}
