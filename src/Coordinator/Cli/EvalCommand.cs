using System.CommandLine;
using System.Text.Json;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Metrics;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>`coordinator eval --checkpoint DIR`: the quality figures of a trained model.</summary>
internal static class EvalCommand
{
    public static Command Create()
    {
        var checkpoint = new Option<string>("--checkpoint") { Description = "A run folder (its latest checkpoint) or one checkpoint folder", Required = true };
        var samples = new Option<int>("--samples") { Description = "2-D data: samples compared with held-out data", DefaultValueFactory = _ => 2000 };
        var images = new Option<int>("--bpd-images") { Description = "Images: held-out images for bits/dim", DefaultValueFactory = _ => 256 };
        var raw = new Option<bool>("--raw-weights") { Description = "Evaluate the raw weights instead of the EMA weights" };
        var json = new Option<bool>("--json") { Description = "Print the figures as JSON" };
        var device = CliSupport.DeviceOption();
        var threads = CliSupport.ThreadsOption();
        var cmd = new Command("eval", "Print quality figures: sliced Wasserstein distance vs its noise floor (2-D), bits/dim and nearest-neighbour distances (images)")
        {
            checkpoint, samples, images, raw, json, device, threads,
        };
        cmd.SetAction(p => Run(p.GetValue(checkpoint)!, p.GetValue(samples), p.GetValue(images), p.GetValue(raw), p.GetValue(json), p.GetValue(device)!, p.GetValue(threads)));
        return cmd;
    }

    private static int Run(string checkpointPath, int samples, int bpdImages, bool rawWeights, bool json, string deviceSpec, int threads)
    {
        if (samples < 2) throw new UsageException($"--samples {samples}: expected at least 2");
        if (bpdImages < 1) throw new UsageException($"--bpd-images {bpdImages}: expected at least 1");
        var device = CliSupport.ResolveDevice(deviceSpec, threads);
        var (model, data) = CliSupport.LoadModel(checkpointPath, rawWeights, device, DatasetLoader.ResolveDataPath);
        using var modelScope = model;
        var recipe = data.Recipe;
        var (train, heldOut) = DatasetLoader.Load(recipe);
        using (train)
        using (heldOut)
        {
            var report = Evaluator.Evaluate(model, data.Step, train, heldOut, samples, bpdImages);
            if (json)
                Console.WriteLine(JsonSerializer.Serialize(report, Model.Training.Recipe.JsonOptions));
            else
                foreach (var line in report.Lines()) Console.WriteLine(line);
        }
        return CliSupport.ExitOk;
    }
}
