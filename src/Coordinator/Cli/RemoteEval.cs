using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Metrics;
using DistDiffusion.Model.Sampling;
using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;
using Grpc.Core;
using static TorchSharp.torch;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>
/// `coordinator eval --address URL` / `--run DIR`: the figures of `eval --checkpoint` for the model a coordinator serves or
/// trains, with the samples and the bits/dim terms computed by its workers (Sampler.Evaluate, one pinned weights snapshot);
/// the data splits, the distances and the means are computed here, as one-process eval does.
/// </summary>
internal static class RemoteEval
{
    /// <summary>What the coordinator computed: samples [n, ...] and per-image bits/dim, at the weights described by <see cref="Progress"/>.</summary>
    internal sealed class Fetched(Tensor samples, float[] totals, float[] priors, EvalProgress progress, int workers) : IEvalSource, IDisposable
    {
        public EvalProgress Progress { get; } = progress;
        /// <summary>The most workers that served the evaluation at once.</summary>
        public int Workers { get; } = workers;

        public Tensor Sample(SamplingRequest request)
        {
            if (request.Count != samples.shape[0])
                throw new InvalidOperationException($"the evaluation asked for {request.Count} samples but {samples.shape[0]} were fetched");
            return samples.alias();
        }

        public (Tensor Total, Tensor Prior) BitsPerDim(Dataset heldOut, int m, long seed)
        {
            if (m != totals.Length) throw new InvalidOperationException($"the evaluation asked for bits/dim of {m} images but {totals.Length} were fetched");
            return (tensor(totals), tensor(priors));
        }

        public void Dispose() => samples.Dispose();
    }

    public static int Run(string addressText, string? tokenFile, double timeoutSeconds, string? tlsCa, int samples, int bpdImages, int bpdBatch, bool rawWeights, bool json,
        SamplingMethod sampler, int steps, double eta, long seed, int classifierSamples = 0, ClassGuidance? conditioning = null)
    {
        if (timeoutSeconds < 0 || !double.IsFinite(timeoutSeconds)) throw new UsageException($"--timeout {timeoutSeconds}: expected seconds >= 0");
        return RemoteCall.Run(addressText, tokenFile, tlsCa, (endpoint, ct) =>
        {
            var clock = Stopwatch.StartNew();
            var (report, fetched) = Evaluate(endpoint.Channel, endpoint.Token, timeoutSeconds, samples, bpdImages, bpdBatch, rawWeights, sampler, steps, eta, seed, showProgress: !json, ct, classifierSamples, conditioning);
            using (fetched)
            {
                if (json)
                {
                    Console.WriteLine(System.Text.Json.JsonSerializer.Serialize(report, Recipe.JsonOptions));
                }
                else
                {
                    foreach (var line in report.Lines()) Console.WriteLine(line);
                    Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                        $"evaluated on {fetched.Workers} workers of {endpoint.Address} ({fetched.Progress.Weights.ToString().ToUpperInvariant()} weights of step {fetched.Progress.Step}, parameter version {fetched.Progress.ParameterVersion}) in {clock.Elapsed.TotalSeconds:F1} s"));
                }
            }
            return CliSupport.ExitOk;
        });
    }

    /// <summary>
    /// Asks the coordinator for its recipe (GetStatus), loads the data splits here, fetches the samples and bits/dim terms of
    /// one weights snapshot (Sampler.Evaluate) and computes the report. Each call is bounded: GetStatus by
    /// <see cref="StatusSeconds"/>, Evaluate by <paramref name="timeoutSeconds"/> (0: none; the coordinator still ends it
    /// when no worker remains).
    /// </summary>
    internal static (EvalReport Report, Fetched Fetched) Evaluate(ChannelBase channel, string? token, double timeoutSeconds, int samples, int bpdImages, int bpdBatch, bool rawWeights,
        SamplingMethod sampler, int steps, double eta, long seed, bool showProgress, CancellationToken ct, int classifierSamples = 0, ClassGuidance? conditioning = null)
    {
        conditioning ??= ClassGuidance.Default;
        EvalCommand.CheckClassifierSamples(classifierSamples);
        if (samples < 2) throw new UsageException($"--samples {samples}: expected at least 2");
        if (bpdImages < 1) throw new UsageException($"--bpd-images {bpdImages}: expected at least 1");
        EvalCommand.CheckBpdBatch(bpdBatch);
        if (steps < 0) throw new UsageException($"--steps {steps}: expected >= 0");
        var status = new Coordination.CoordinationClient(channel).GetStatus(new GetStatusRequest(), Token.Headers(token), DateTime.UtcNow.AddSeconds(StatusSeconds), ct);
        if (status.RecipeJson.Length == 0)
            throw new InvalidOperationException($"the coordinator did not send its recipe (recipe {status.Recipe}): it is older than this client; evaluate a checkpoint with --checkpoint");
        var recipe = Recipe.FromJson(status.RecipeJson).WithResolvedDataPath();
        var (train, heldOut) = DatasetLoader.Load(recipe.ToDataOptions());
        using (train)
        using (heldOut)
        {
            // The classifier runs here, on the samples the workers drew (trained and cached on first use, like eval --checkpoint's).
            using var classifier = EvalCommand.ObtainClassifier(recipe, train, heldOut, classifierSamples);
            var used = classifier is null ? 0 : classifierSamples;
            var plan = Evaluator.Plan(recipe, heldOut.Count, samples, bpdImages, used);
            if (conditioning.Problem(recipe.Classes) is { } problem) throw new UsageException(problem);
            var fetched = Fetch(channel, token, timeoutSeconds, recipe, plan, (ulong)heldOut.Count, bpdBatch, rawWeights, sampler, steps, eta, seed, showProgress, conditioning, ct);
            try
            {
                var report = Evaluator.Evaluate(fetched, recipe, (long)fetched.Progress.Step, train, heldOut, samples, bpdImages, seed, sampler, steps, eta,
                    classifier?.Network, classifier?.Info.HeldOutAccuracy, used, conditioning);
                return (report, fetched);
            }
            catch
            {
                fetched.Dispose();
                throw;
            }
        }
    }

    /// <summary>Bound of the GetStatus call that reads the recipe.</summary>
    internal const double StatusSeconds = 30;

    private static Fetched Fetch(ChannelBase channel, string? token, double timeoutSeconds, Recipe recipe, (int Samples, int BpdImages) plan, ulong heldOutSize, int bpdBatch,
        bool rawWeights, SamplingMethod sampler, int steps, double eta, long seed, bool showProgress, ClassGuidance conditioning, CancellationToken ct)
    {
        var request = new EvalRequest
        {
            Samples = (uint)plan.Samples,
            Sampler = sampler == SamplingMethod.Ddim ? SamplerKind.Ddim : SamplerKind.Ddpm,
            Steps = (uint)steps,
            Eta = eta,
            Seed = seed,
            Weights = rawWeights ? Weights.Raw : Weights.Unspecified,
            BpdImages = (uint)plan.BpdImages,
            HeldOutSize = heldOutSize,
            BpdBatch = (uint)bpdBatch,
        };
        CliSupport.Apply(conditioning, k => request.ClassLabel = k, g => request.Guidance = g);
        var deadline = timeoutSeconds > 0 ? DateTime.UtcNow.AddSeconds(timeoutSeconds) : (DateTime?)null;
        using var call = new Sampler.SamplerClient(channel).Evaluate(request, Token.Headers(token), deadline, ct);
        var elements = (int)recipe.SampleShape.Aggregate(1L, (a, b) => a * b);
        var values = new float[(long)plan.Samples * elements];
        var totals = new float[plan.BpdImages];
        var priors = new float[plan.BpdImages];
        var haveSample = new bool[plan.Samples];
        var haveImage = new bool[plan.BpdImages];
        EvalProgress? first = null;
        var workers = 0;
        var bar = showProgress ? new ProgressBar("eval", 0, plan.Samples + plan.BpdImages, "samples + images") : null;
        while (call.ResponseStream.MoveNext(ct).GetAwaiter().GetResult())
        {
            var m = call.ResponseStream.Current;
            switch (m.KindCase)
            {
                case EvalResponse.KindOneofCase.Progress:
                    first ??= m.Progress;
                    workers = Math.Max(workers, (int)m.Progress.Workers);
                    bar?.Update(m.Progress.SamplesDone + m.Progress.ImagesDone, $"{m.Progress.Workers} workers, step {m.Progress.Step}");
                    break;
                case EvalResponse.KindOneofCase.Samples:
                {
                    var s = m.Samples;
                    Check(s.FirstIndex, s.Count, haveSample, "samples");
                    if (s.Tensor.Length != (long)s.Count * elements * 4)
                        throw new InvalidOperationException($"coordinator sent {s.Tensor.Length} bytes for samples {s.FirstIndex}..+{s.Count}, expected {(long)s.Count * elements * 4}");
                    MemoryMarshal.Cast<byte, float>(s.Tensor.Span).CopyTo(values.AsSpan((int)(s.FirstIndex * elements)));
                    break;
                }
                case EvalResponse.KindOneofCase.BitsPerDim:
                {
                    var b = m.BitsPerDim;
                    Check(b.FirstIndex, b.Count, haveImage, "bits/dim images");
                    if (b.Totals.Length != b.Count * 4 || b.Priors.Length != b.Count * 4)
                        throw new InvalidOperationException($"coordinator sent {b.Totals.Length} + {b.Priors.Length} bytes for bits/dim of images {b.FirstIndex}..+{b.Count}, expected {b.Count * 4} each");
                    MemoryMarshal.Cast<byte, float>(b.Totals.Span).CopyTo(totals.AsSpan((int)b.FirstIndex));
                    MemoryMarshal.Cast<byte, float>(b.Priors.Span).CopyTo(priors.AsSpan((int)b.FirstIndex));
                    break;
                }
            }
        }
        if (first is null) throw new InvalidOperationException("the coordinator ended the evaluation without a reply");
        if (Array.IndexOf(haveSample, false) is var s0 and >= 0) throw new InvalidOperationException($"the evaluation stream ended without sample {s0}");
        if (Array.IndexOf(haveImage, false) is var i0 and >= 0) throw new InvalidOperationException($"the evaluation stream ended without the bits/dim of image {i0}");
        return new Fetched(tensor(values, [plan.Samples, .. recipe.SampleShape]), totals, priors, first, workers);
    }

    private static void Check(uint firstIndex, uint count, bool[] have, string what)
    {
        if ((long)firstIndex + count > have.Length)
            throw new InvalidOperationException($"coordinator sent {what} {firstIndex}..+{count} of an evaluation of {have.Length}");
        for (var i = firstIndex; i < firstIndex + count; i++)
        {
            if (have[i]) throw new InvalidOperationException($"coordinator sent {what} {i} twice");
            have[i] = true;
        }
    }
}
