using System.Globalization;
using System.Runtime.InteropServices;
using DistDiffusion.Coordinator.Observe;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using static TorchSharp.torch;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>`coordinator sample --address URL`: a Sampler.Sample call with a progress bar; writes the grid/scatter PNG or .npy.</summary>
internal static class RemoteSampler
{
    public static int Run(string addressText, string? tokenFile, double timeoutSeconds, string? tlsCa, int n, SamplingMethod kind, int steps, double eta,
        long seed, bool rawWeights, int trajectoryEvery, string output, Model.Sampling.ClassGuidance conditioning)
    {
        var ext = CliSupport.UserInput(() => RunPictures.OutputKind(output));
        if (n < 1) throw new UsageException($"--n {n}: expected at least 1 sample");
        if (steps < 0) throw new UsageException($"--steps {steps}: expected >= 0");
        if (trajectoryEvery < 0) throw new UsageException($"--trajectory-every {trajectoryEvery}: expected >= 0");
        if (timeoutSeconds < 0 || !double.IsFinite(timeoutSeconds)) throw new UsageException($"--timeout {timeoutSeconds}: expected seconds >= 0");
        var request = new SampleRequest
        {
            Count = (uint)n,
            Sampler = kind == SamplingMethod.Ddim ? SamplerKind.Ddim : SamplerKind.Ddpm,
            Steps = (uint)steps,
            Eta = eta,
            Seed = seed,
            Weights = rawWeights ? Weights.Raw : Weights.Unspecified,
            Tensor = true,
            TrajectoryEvery = (uint)trajectoryEvery,
        };
        CliSupport.Apply(conditioning, k => request.ClassLabel = k, g => request.Guidance = g);
        return RemoteCall.Run(addressText, tokenFile, tlsCa, (endpoint, ct) =>
        {
            var deadline = timeoutSeconds > 0 ? DateTime.UtcNow.AddSeconds(timeoutSeconds) : (DateTime?)null;
            using var call = new Sampler.SamplerClient(endpoint.Channel).Sample(request, Token.Headers(endpoint.Token), deadline, ct);
            var samples = new float[n][];
            var frames = new List<float[]>[n];
            long[] shape = [];
            var bar = new ProgressBar("sample", 0, n, "samples");
            SampleProgress? first = null;
            var clock = System.Diagnostics.Stopwatch.StartNew();
            double? firstResult = null;
            while (call.ResponseStream.MoveNext(ct).GetAwaiter().GetResult())
            {
                var m = call.ResponseStream.Current;
                if (m.KindCase == SampleResponse.KindOneofCase.Progress)
                {
                    first ??= m.Progress;
                    bar.Update(m.Progress.Done, $"{m.Progress.Workers} workers");
                    continue;
                }
                var r = m.Result;
                if (r.Index >= n) throw new InvalidOperationException($"coordinator sent sample {r.Index} of a request for {n}");
                firstResult ??= clock.Elapsed.TotalSeconds;
                var trajectory = r.Trajectory.Select(f => MemoryMarshal.Cast<byte, float>(f.Span).ToArray());
                if (r.TrajectoryOffset > 0)
                {
                    // More frames of a sample whose trajectory did not fit one message.
                    if (frames[r.Index]?.Count != r.TrajectoryOffset)
                        throw new InvalidOperationException($"coordinator sent frames from {r.TrajectoryOffset} of sample {r.Index} out of order");
                    frames[r.Index].AddRange(trajectory);
                    continue;
                }
                shape = [.. r.Shape];
                samples[r.Index] = MemoryMarshal.Cast<byte, float>(r.Tensor.Span).ToArray();
                frames[r.Index] = [.. trajectory];
            }
            var missing = Array.FindIndex(samples, s => s is null);
            if (missing >= 0) throw new InvalidOperationException($"the stream ended without sample {missing}");
            using var scope = NewDisposeScope();
            var all = tensor(samples.SelectMany(s => s).ToArray(), [n, .. shape]);
            var recipe = new Recipe { Name = first?.Recipe ?? "remote", Dataset = shape.Length == 1 ? Model.Data.DatasetKind.SwissRoll : Model.Data.DatasetKind.Mnist };
            using var reference = shape.Length == 1 && Known(first?.Recipe) is { } known ? RunPictures.Reference(known, Math.Max(n, 1000)) : null;
            RunPictures.Write(output, all, recipe, reference, $"{first?.Recipe} v{first?.ParameterVersion} {(kind == SamplingMethod.Ddim ? "ddim" : "ddpm")}");
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"wrote {n} samples ({(kind == SamplingMethod.Ddim ? "ddim" : "ddpm")}, {first?.Weights.ToString().ToUpperInvariant()} weights of parameter version {first?.ParameterVersion}, {first?.Workers} workers) to {output} in {clock.Elapsed.TotalSeconds:F1} s (first result after {firstResult:F2} s)"));
            if (trajectoryEvery > 0 && frames[0].Count > 0)
            {
                var strip = Enumerable.Range(0, frames[0].Count).Select(f => tensor(frames.SelectMany(s => s[f]).ToArray(), [n, .. shape])).ToList();
                Console.WriteLine($"wrote the trajectory to {RunPictures.WriteTrajectory(output, strip)}");
            }
            return CliSupport.ExitOk;
        });
    }

    /// <summary>The named recipe when it is a built-in one (its data are the reference points of a 2-D scatter plot).</summary>
    private static Recipe? Known(string? name) => Recipes.All.FirstOrDefault(r => r.Name == name);
}
