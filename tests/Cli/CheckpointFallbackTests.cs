using System.Text.Json;

namespace DistDiffusion.Tests.Cli;

/// <summary>`sample` and `eval --checkpoint RUN` pass over a damaged newest checkpoint as `train`, `serve` and `run` do.</summary>
[Collection(CliCollection.Name)]
public sealed class CheckpointFallbackTests() : TempFolderTest("dd-fallback")
{
    [Fact]
    public void SampleAndEvalUseThePreviousCheckpointAndSaySo()
    {
        var run = Path.Combine(Dir, "run");
        var (code, _, err) = CliHarness.Run("train", "--recipe", "swissroll", "--out", run, "--steps", "4", "--threads", "1",
            "--set", "hidden-size=8", "--set", "timesteps=5", "--set", "checkpoint-every=2", "--set", "sample-every=0");
        Assert.True(code == 0, err);
        var latest = Path.Combine(run, "checkpoints", "4");
        var previous = Path.Combine(run, "checkpoints", "2");
        var model = Path.Combine(latest, "model.safetensors");
        var bytes = File.ReadAllBytes(model);
        bytes[^1] ^= 0xFF;
        File.WriteAllBytes(model, bytes);

        var npy = Path.Combine(Dir, "s.npy");
        string output;
        (code, output, err) = CliHarness.Run("sample", "--checkpoint", run, "--n", "3", "--out", npy, "--threads", "1");
        Assert.True(code == 0, err);
        Assert.Contains("weights of step 2)", output, StringComparison.Ordinal);
        Assert.Contains($"warning: checkpoint {latest} cannot be read, skipped: ", err, StringComparison.Ordinal);
        Assert.Contains("checksum", err, StringComparison.Ordinal);
        Assert.Contains($"using the newest readable checkpoint instead: {previous}", err, StringComparison.Ordinal);
        Assert.True(File.Exists(npy));

        (code, output, err) = CliHarness.Run("eval", "--checkpoint", run, "--samples", "50", "--json", "--threads", "1");
        Assert.True(code == 0, err);
        Assert.Equal(2, JsonDocument.Parse(output).RootElement.GetProperty("Step").GetInt64());
        Assert.Contains($"warning: checkpoint {latest} cannot be read, skipped: ", err, StringComparison.Ordinal);
        Assert.Contains($"using the newest readable checkpoint instead: {previous}", err, StringComparison.Ordinal);

        // The damaged checkpoint asked for by its own path is not replaced by another: that is an error.
        (code, _, err) = CliHarness.Run("sample", "--checkpoint", latest, "--n", "3", "--out", npy);
        Assert.Equal(1, code);
        Assert.Contains("checksum", err, StringComparison.Ordinal);
    }
}
