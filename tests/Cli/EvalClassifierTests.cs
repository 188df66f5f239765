using System.Text.Json;
using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Model.Metrics;

namespace DistDiffusion.Tests.Cli;

/// <summary>`coordinator classifier` and the classifier figures of `coordinator eval` on a tiny MNIST checkpoint and a tiny classifier.</summary>
[Collection(CliCollection.Name)]
public sealed class EvalClassifierTests() : TempFolderTest("dd-eval-classifier")
{
    [Fact]
    public void ClassifierVerbCachesAndEvalPrintsTheClassifierFigures()
    {
        var data = Path.Combine(Dir, "mnist");
        Directory.CreateDirectory(data);
        foreach (var f in Directory.GetFiles(Data.TestFiles.MnistFolder, "*-ubyte.gz"))
            File.Copy(f, Path.Combine(data, Path.GetFileName(f)));
        var saved = ClassifierCommand.Config;
        ClassifierCommand.Config = new ClassifierConfig { Epochs = 2, TrainLimit = 500, BatchSize = 25, Conv1Channels = 4, Conv2Channels = 8, Features = 16 };
        try
        {
            var (code, output, err) = CliHarness.Run("classifier", "--data", data, "--threads", "1");
            Assert.True(code == 0, err);
            Assert.Contains("classifier: held-out accuracy", output);
            Assert.Contains("training the evaluation classifier", err);
            Assert.True(File.Exists(Path.Combine(data, "classifier", ClassifierCache.InfoFileName)));
            (code, output, err) = CliHarness.Run("classifier", "--data", data, "--threads", "1");
            Assert.True(code == 0, err);
            Assert.Contains("cached", output);
            Assert.DoesNotContain("training", err);

            var run = Path.Combine(Dir, "run");
            (code, _, err) = CliHarness.Run("train", "--recipe", "mnist-small", "--out", run, "--steps", "2", "--threads", "1",
                "--set", $"data-path={data}", "--set", "base-channels=8", "--set", "group-norm-groups=4", "--set", "channel-multipliers=1,2",
                "--set", "attention-heads=1", "--set", "attention-head-size=8", "--set", "timesteps=4", "--set", "batch-size=4", "--set", "micro-batches=2",
                "--set", "sample-every=0", "--set", "checkpoint-every=2");
            Assert.True(code == 0, err);

            (code, output, err) = CliHarness.Run("eval", "--checkpoint", run, "--classifier-samples", "12", "--bpd-images", "4", "--threads", "1");
            Assert.True(code == 0, err);
            Assert.DoesNotContain("training the evaluation classifier", err);   // the verb cached it
            Assert.Contains("bits/dim on 4 held-out images", output);
            Assert.Contains("nearest training image", output);
            Assert.Matches(@"classifier \(held-out accuracy \d+\.\d\d%\): 12 samples: \d+\.\d% confident \(>= 0\.9\), \d+ classes \[(\d+ ){9}\d+\]; 12 held-out: ", output);
            Assert.Matches(@"classifier FID: samples \d+\.\d\d \(vs 12 held-out images\), train-vs-held-out floor \d+\.\d\d \(12 training images\)", output);

            // Without a cache, eval trains the classifier on first use and says so; the figures are in the JSON too.
            Directory.Delete(Path.Combine(data, "classifier"), recursive: true);
            (code, output, err) = CliHarness.Run("eval", "--checkpoint", run, "--classifier-samples", "12", "--bpd-images", "4", "--threads", "1", "--json");
            Assert.True(code == 0, err);
            Assert.Contains("training the evaluation classifier", err);
            Assert.Contains("classifier: held-out accuracy", err);
            using var json = JsonDocument.Parse(output);
            var root = json.RootElement;
            var fid = root.GetProperty("ClassifierFid").GetDouble();
            var floor = root.GetProperty("ClassifierFidFloor").GetDouble();
            Assert.True(fid > floor, $"an untrained model's samples (FID {fid}) are further from the data than real images are (floor {floor})");
            Assert.Equal(12, root.GetProperty("SampleClasses").GetProperty("Histogram").EnumerateArray().Sum(e => e.GetInt32()));
            Assert.InRange(root.GetProperty("ClassifierAccuracy").GetDouble(), 0.4, 1.0);

            // Skipping the classifier figures, and a bad count.
            (code, output, err) = CliHarness.Run("eval", "--checkpoint", run, "--classifier-samples", "0", "--bpd-images", "2", "--threads", "1");
            Assert.True(code == 0, err);
            Assert.DoesNotContain("classifier", output);
            (code, _, err) = CliHarness.Run("eval", "--checkpoint", run, "--classifier-samples", "1");
            Assert.Equal(2, code);
            Assert.Contains("--classifier-samples 1: expected 0 (skip) or at least 2", err);
        }
        finally
        {
            ClassifierCommand.Config = saved;
        }
    }

    [Fact]
    public void ClassifierVerbRejectsBadValues()
    {
        var (code, _, err) = CliHarness.Run("classifier", "--data", Path.Combine(Dir, "nope"));
        Assert.Equal(2, code);
        Assert.Contains("folder does not exist", err);
        (code, _, err) = CliHarness.Run("classifier", "--data", Dir, "--held-out-fraction", "1.5");
        Assert.Equal(2, code);
        Assert.Contains("--held-out-fraction 1.5: expected a fraction in (0, 1)", err);
        (code, _, err) = CliHarness.Run("classifier", "--data", Dir, "--dataset", "cifar");
        Assert.Equal(2, code);
        Assert.Contains("--dataset cifar: expected mnist or fashion-mnist", err);
    }
}
