using System.CommandLine;
using System.Text.Json;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Metrics;
using DistDiffusion.Model.Sampling;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>
/// `coordinator eval --checkpoint DIR`: the quality figures of a trained model, computed in this process;
/// `--address URL` / `--run DIR`: the same figures for the model a coordinator serves or trains, its workers computing the
/// samples and the bits/dim terms (<see cref="RemoteEval"/>).
/// </summary>
internal static class EvalCommand
{
    /// <summary>The evaluation seed of both ways (Evaluator's default): the same samples and noise here and on the workers.</summary>
    internal const long Seed = 1234;

    /// <summary>Most held-out images per bits/dim batch (the coordinator's limit too).</summary>
    internal const int MaxBpdBatch = Transport.SamplingService.MaxBpdBatch;

    /// <summary>The data set's classifier for labelled MNIST-style data and a non-zero --classifier-samples (null otherwise).</summary>
    internal static CachedClassifier? ObtainClassifier(Recipe recipe, Dataset train, Dataset heldOut, int classifierSamples)
    {
        var labelled = recipe.Dataset is DatasetKind.Mnist or DatasetKind.FashionMnist && train.Labels is not null && heldOut.Labels is not null;
        return labelled && classifierSamples > 0 ? ClassifierCommand.Obtain(recipe, train, heldOut) : null;
    }

    internal static void CheckClassifierSamples(int classifierSamples)
    {
        if (classifierSamples is < 0 or 1) throw new UsageException($"--classifier-samples {classifierSamples}: expected 0 (skip) or at least 2");
    }

    internal static void CheckBpdBatch(int bpdBatch)
    {
        if (bpdBatch is < 1 or > MaxBpdBatch) throw new UsageException($"--bpd-batch {bpdBatch}: expected 1..{MaxBpdBatch} images per batch");
    }

    public static Command Create()
    {
        var checkpoint = new Option<string?>("--checkpoint") { Description = "Evaluate in this process a run folder (its latest checkpoint) or one checkpoint folder" };
        var address = new Option<string?>("--address") { Description = $"Evaluate the model of the coordinator at this URL on its workers instead (e.g. {DistDiffusion.Protocol.Names.DefaultAddress})" };
        var run = RunEndpoints.RunOption();
        var tokenFile = CliSupport.TokenFileOption();
        var timeout = new Option<double>("--timeout") { Description = "With --address/--run: give up after this many seconds (0: no deadline)", DefaultValueFactory = _ => 3600 };
        var tlsCa = new Option<string?>("--tls-ca") { Description = "With --address: CA certificate (PEM) to trust for an https coordinator" };
        var samples = new Option<int>("--samples") { Description = "2-D data: samples compared with held-out data", DefaultValueFactory = _ => 2000 };
        var images = new Option<int>("--bpd-images") { Description = "Images: held-out images for bits/dim", DefaultValueFactory = _ => 256 };
        var raw = new Option<bool>("--raw-weights") { Description = "Evaluate the raw weights instead of the EMA weights" };
        var json = new Option<bool>("--json") { Description = "Print the figures as JSON" };
        var bpdBatch = new Option<int>("--bpd-batch")
        {
            Description = $"Images: held-out images per network batch of bits/dim (the terms depend on it; with --address, the unit of work a worker gets)",
            DefaultValueFactory = _ => Evaluator.DefaultBpdBatch,
        };
        var sampler = new Option<string>("--sampler") { Description = "Sampler of the evaluated samples: ddpm (all T steps) or ddim", DefaultValueFactory = _ => "ddpm" };
        var steps = new Option<int>("--steps") { Description = "DDIM: number of strided steps (0: all T)", DefaultValueFactory = _ => 0 };
        var eta = new Option<double>("--eta") { Description = "DDIM eta in [0, 1]", DefaultValueFactory = _ => 0.0 };
        var classifierSamples = new Option<int>("--classifier-samples")
        {
            Description = "Labelled images (MNIST, Fashion-MNIST): samples labelled by the data set's classifier and compared with as many held-out images (classifier FID); 0 skips. The classifier is trained and cached on first use (see the classifier verb)",
            DefaultValueFactory = _ => 1000,
        };
        var classOption = CliSupport.ClassOption();
        var guidance = CliSupport.GuidanceOption();
        var device = CliSupport.DeviceOption();
        var threads = CliSupport.ThreadsOption();
        var cmd = new Command("eval", "Print quality figures: sliced Wasserstein distance vs its noise floor (2-D), bits/dim and nearest-neighbour distances (images), and for labelled images (MNIST, Fashion-MNIST) the data-set classifier's confident-class shares, class histograms and classifier FID")
        {
            checkpoint, address, run, tokenFile, timeout, tlsCa, samples, images, bpdBatch, raw, json, sampler, steps, eta, classifierSamples, classOption, guidance, device, threads,
        };
        cmd.SetAction(p =>
        {
            var (url, tokenPath) = RunEndpoints.ResolveTarget(p.GetValue(checkpoint), p.GetValue(address), p.GetValue(run), p.GetValue(tokenFile),
                "evaluate here", "evaluate on a coordinator's workers");
            if (url is not null)
                return RemoteEval.Run(url, tokenPath, p.GetValue(timeout), p.GetValue(tlsCa), p.GetValue(samples), p.GetValue(images), p.GetValue(bpdBatch), p.GetValue(raw), p.GetValue(json),
                    SampleCommand.ParseSampler(p.GetValue(sampler)!), p.GetValue(steps), p.GetValue(eta), Seed, p.GetValue(classifierSamples),
                    CliSupport.Conditioning(p, classOption, guidance));
            return Run(p.GetValue(checkpoint)!, p.GetValue(samples), p.GetValue(images), p.GetValue(bpdBatch), p.GetValue(raw), p.GetValue(json),
                SampleCommand.ParseSampler(p.GetValue(sampler)!), p.GetValue(steps), p.GetValue(eta), p.GetValue(device)!, p.GetValue(threads), p.GetValue(classifierSamples),
                CliSupport.Conditioning(p, classOption, guidance));
        });
        return cmd;
    }

    private static int Run(string checkpointPath, int samples, int bpdImages, int bpdBatch, bool rawWeights, bool json, SamplingMethod sampler, int steps, double eta, string deviceSpec, int threads, int classifierSamples,
        ClassGuidance conditioning)
    {
        CheckClassifierSamples(classifierSamples);
        if (samples < 2) throw new UsageException($"--samples {samples}: expected at least 2");
        if (bpdImages < 1) throw new UsageException($"--bpd-images {bpdImages}: expected at least 1");
        CheckBpdBatch(bpdBatch);
        var device = CliSupport.ResolveDevice(deviceSpec, threads);
        var (model, data) = CliSupport.LoadModel(checkpointPath, rawWeights, device, r => r.WithResolvedDataPath());
        using var modelScope = model;
        CliSupport.UserInput(() => { new SamplingRequest(1, sampler, steps, eta, 0, Conditioning: conditioning).Validate(model.Diffusion.T, model.Network.Classes); return true; });
        var recipe = data.Recipe;
        var (train, heldOut) = DatasetLoader.Load(recipe.ToDataOptions());
        using (train)
        using (heldOut)
        {
            // Labelled MNIST-style data: the data set's classifier (cached next to the data; trained here on first use).
            using var classifier = ObtainClassifier(recipe, train, heldOut, classifierSamples);
            var report = Evaluator.Evaluate(new LocalEvalSource(model) { BpdBatch = bpdBatch }, model.Recipe, data.Step, train, heldOut, samples, bpdImages, sampler: sampler, samplerSteps: steps, eta: eta,
                classifier: classifier?.Network, classifierAccuracy: classifier?.Info.HeldOutAccuracy, classifierSamples: classifierSamples, conditioning: conditioning);
            if (json)
                Console.WriteLine(JsonSerializer.Serialize(report, Recipe.JsonOptions));
            else
                foreach (var line in report.Lines()) Console.WriteLine(line);
        }
        return CliSupport.ExitOk;
    }
}
