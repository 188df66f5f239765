using System.CommandLine;
using System.Globalization;
using DistDiffusion.Coordinator.Observe;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Sampling;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>
/// `coordinator sample --checkpoint DIR`: samples from a checkpoint in this process; `coordinator sample --address URL`:
/// asks a running coordinator, whose workers compute the chains (same samples for the same seed either way).
/// </summary>
internal static class SampleCommand
{
    public static Command Create()
    {
        var checkpoint = new Option<string?>("--checkpoint") { Description = "Sample in this process from a run folder (its latest checkpoint) or one checkpoint folder" };
        var address = new Option<string?>("--address") { Description = $"Ask the coordinator at this URL instead (e.g. {DistDiffusion.Protocol.Names.DefaultAddress})" };
        var tokenFile = CliSupport.TokenFileOption();
        var run = RunEndpoints.RunOption();
        var timeout = new Option<double>("--timeout") { Description = "With --address: give up after this many seconds (0: no deadline)", DefaultValueFactory = _ => 0 };
        var tlsCa = new Option<string?>("--tls-ca") { Description = "With --address: CA certificate (PEM) to trust for an https coordinator" };
        var n = new Option<int>("--n") { Description = "Number of samples", DefaultValueFactory = _ => 64 };
        var sampler = new Option<string>("--sampler") { Description = "ddpm (ancestral, all T steps) or ddim", DefaultValueFactory = _ => "ddpm" };
        var steps = new Option<int>("--steps") { Description = "DDIM: number of strided steps (0: all T)", DefaultValueFactory = _ => 0 };
        var eta = new Option<double>("--eta") { Description = "DDIM eta in [0, 1] (0: deterministic)", DefaultValueFactory = _ => 0.0 };
        var seed = new Option<long>("--seed") { Description = "Sample stream seed: sample i depends only on (seed, i)", DefaultValueFactory = _ => 0 };
        var raw = new Option<bool>("--raw-weights") { Description = "Use the raw weights instead of the EMA weights" };
        var trajectory = new Option<int>("--trajectory-every") { Description = "Also write a strip of every k-th step of the chain (0: none)", DefaultValueFactory = _ => 0 };
        var output = new Option<string>("--out") { Description = "Output file: .png (grid or scatter plot) or .npy (float32 [N, ...])", Required = true };
        var batch = new Option<int>("--batch") { Description = "Chains computed at once", DefaultValueFactory = _ => 256 };
        var classOption = CliSupport.ClassOption();
        var guidance = CliSupport.GuidanceOption();
        var device = CliSupport.DeviceOption();
        var threads = CliSupport.ThreadsOption();
        var cmd = new Command("sample", "Draw samples from a trained model")
        {
            checkpoint, address, run, tokenFile, timeout, tlsCa, n, sampler, steps, eta, seed, raw, trajectory, output, batch, classOption, guidance, device, threads,
        };
        cmd.SetAction(p =>
        {
            var (url, tokenPath) = RunEndpoints.ResolveTarget(p.GetValue(checkpoint), p.GetValue(address), p.GetValue(run), p.GetValue(tokenFile),
                "sample here", "ask a coordinator");
            if (url is not null)
                return RemoteSampler.Run(url, tokenPath, p.GetValue(timeout), p.GetValue(tlsCa), p.GetValue(n), ParseSampler(p.GetValue(sampler)!),
                    p.GetValue(steps), p.GetValue(eta), p.GetValue(seed), p.GetValue(raw), p.GetValue(trajectory), p.GetValue(output)!,
                    CliSupport.Conditioning(p, classOption, guidance));
            return Run(p.GetValue(checkpoint)!, p.GetValue(n), p.GetValue(sampler)!, p.GetValue(steps), p.GetValue(eta),
                p.GetValue(seed), p.GetValue(raw), p.GetValue(trajectory), p.GetValue(output)!, p.GetValue(batch), p.GetValue(device)!, p.GetValue(threads),
                CliSupport.Conditioning(p, classOption, guidance));
        });
        return cmd;
    }

    public static SamplingMethod ParseSampler(string s) => s.Trim().ToLowerInvariant() switch
    {
        "ddpm" => SamplingMethod.Ddpm,
        "ddim" => SamplingMethod.Ddim,
        _ => throw new UsageException($"--sampler {s}: expected ddpm or ddim"),
    };

    private static int Run(string checkpointPath, int n, string samplerName, int steps, double eta, long seed, bool rawWeights,
        int trajectoryEvery, string output, int batch, string deviceSpec, int threads, ClassGuidance conditioning)
    {
        var kind = ParseSampler(samplerName);
        var ext = CliSupport.UserInput(() => RunPictures.OutputKind(output));
        if (batch < 1) throw new UsageException($"--batch {batch}: expected >= 1");
        var device = CliSupport.ResolveDevice(deviceSpec, threads);
        var (model, data) = CliSupport.LoadModel(checkpointPath, rawWeights, device);
        using var modelScope = model;
        var request = new SamplingRequest(n, kind, steps, eta, seed, 0, trajectoryEvery, conditioning);
        CliSupport.UserInput(() => { request.Validate(model.Diffusion.T, model.Network.Classes); return true; });
        var bar = new ProgressBar("sample", 0, n, "samples");
        var started = System.Diagnostics.Stopwatch.StartNew();
        using var result = model.Sample(request, batch, done => bar.Update(done));
        using var reference = RunPictures.Reference(model.Recipe, Math.Max(n, 1000));
        RunPictures.Write(output, result.Samples, model.Recipe, reference,
            $"{model.Recipe.Name} step {data.Step} {samplerName}{(model.Recipe.Classes > 0 ? ", " + conditioning.Describe(model.Recipe.Classes, model.Recipe.Guidance) : "")}");
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"wrote {n} samples ({samplerName}, {(kind == SamplingMethod.Ddpm ? model.Diffusion.T : steps == 0 ? model.Diffusion.T : steps)} steps, {(rawWeights || data.Ema.Count == 0 ? "raw" : "EMA")} weights of step {data.Step}) to {output} in {started.Elapsed.TotalSeconds:F1} s"));
        if (trajectoryEvery > 0)
            Console.WriteLine($"wrote the trajectory to {RunPictures.WriteTrajectory(output, result.Trajectory)}");
        return CliSupport.ExitOk;
    }
}
