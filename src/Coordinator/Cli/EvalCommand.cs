using System.CommandLine;
using System.Text.Json;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Metrics;
using DistDiffusion.Model.Sampling;

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
        var sampler = new Option<string>("--sampler") { Description = "Sampler of the evaluated samples: ddpm (all T steps) or ddim", DefaultValueFactory = _ => "ddpm" };
        var steps = new Option<int>("--steps") { Description = "DDIM: number of strided steps (0: all T)", DefaultValueFactory = _ => 0 };
        var eta = new Option<double>("--eta") { Description = "DDIM eta in [0, 1]", DefaultValueFactory = _ => 0.0 };
        var classifierSamples = new Option<int>("--classifier-samples")
        {
            Description = "Labelled images (MNIST, Fashion-MNIST): samples labelled by the data set's classifier and compared with as many held-out images (classifier FID); 0 skips. The classifier is trained and cached on first use (see the classifier verb)",
            DefaultValueFactory = _ => 1000,
        };
        var device = CliSupport.DeviceOption();
        var threads = CliSupport.ThreadsOption();
        var cmd = new Command("eval", "Print quality figures: sliced Wasserstein distance vs its noise floor (2-D), bits/dim and nearest-neighbour distances (images), and for labelled images (MNIST, Fashion-MNIST) the data-set classifier's confident-class shares, class histograms and classifier FID")
        {
            checkpoint, samples, images, raw, json, sampler, steps, eta, classifierSamples, device, threads,
        };
        cmd.SetAction(p => Run(p.GetValue(checkpoint)!, p.GetValue(samples), p.GetValue(images), p.GetValue(raw), p.GetValue(json),
            SampleCommand.ParseSampler(p.GetValue(sampler)!), p.GetValue(steps), p.GetValue(eta), p.GetValue(device)!, p.GetValue(threads), p.GetValue(classifierSamples)));
        return cmd;
    }

    private static int Run(string checkpointPath, int samples, int bpdImages, bool rawWeights, bool json, SamplingMethod sampler, int steps, double eta, string deviceSpec, int threads, int classifierSamples = 0)
    {
        if (classifierSamples is < 0 or 1) throw new UsageException($"--classifier-samples {classifierSamples}: expected 0 (skip) or at least 2");
        if (samples < 2) throw new UsageException($"--samples {samples}: expected at least 2");
        if (bpdImages < 1) throw new UsageException($"--bpd-images {bpdImages}: expected at least 1");
        var device = CliSupport.ResolveDevice(deviceSpec, threads);
        var (model, data) = CliSupport.LoadModel(checkpointPath, rawWeights, device, DatasetLoader.ResolveDataPath);
        using var modelScope = model;
        CliSupport.UserInput(() => { new SamplingRequest(1, sampler, steps, eta, 0).Validate(model.Diffusion.T); return true; });
        var recipe = data.Recipe;
        var (train, heldOut) = DatasetLoader.Load(recipe);
        using (train)
        using (heldOut)
        {
            // Labelled MNIST-style data: the data set's classifier (cached next to the data; trained here on first use).
            var labelled = recipe.Dataset is DatasetKind.Mnist or DatasetKind.FashionMnist && train.Labels is not null && heldOut.Labels is not null;
            using var classifier = labelled && classifierSamples > 0 ? ClassifierCommand.Obtain(recipe, train, heldOut) : null;
            var report = Evaluator.Evaluate(model, data.Step, train, heldOut, samples, bpdImages, sampler: sampler, samplerSteps: steps, eta: eta,
                classifier: classifier?.Network, classifierAccuracy: classifier?.Info.HeldOutAccuracy, classifierSamples: classifierSamples);
            if (json)
                Console.WriteLine(JsonSerializer.Serialize(report, Model.Training.Recipe.JsonOptions));
            else
                foreach (var line in report.Lines()) Console.WriteLine(line);
        }
        return CliSupport.ExitOk;
    }
}
