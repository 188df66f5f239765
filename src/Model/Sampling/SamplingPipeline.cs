using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Networks;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Sampling;

/// <summary>What to sample: samples FirstIndex .. FirstIndex + Count - 1 of the stream named by Seed.</summary>
/// <param name="TrajectoryEvery">Keep x every k-th visited step (0: no trajectory); x_T and x_0 are always kept when k &gt; 0.</param>
/// <param name="Conditioning">Class-conditional models: the classes and guidance scale (null: the classes in turn, the recipe's scale).</param>
public sealed record SamplingRequest(int Count, SamplingMethod Sampler, int Steps, double Eta, long Seed, long FirstIndex = 0, int TrajectoryEvery = 0,
    ClassGuidance? Conditioning = null)
{
    /// <param name="classes">the model's class count (0: unconditional).</param>
    public void Validate(int timesteps, int classes = 0)
    {
        if ((Conditioning ?? ClassGuidance.Default).Problem(classes) is { } conditioning) throw new ArgumentException(conditioning);
        if (Count < 1) throw new ArgumentException($"n = {Count}: expected at least 1 sample");
        if (FirstIndex < 0) throw new ArgumentException($"first index = {FirstIndex}: expected >= 0");
        if (TrajectoryEvery < 0) throw new ArgumentException($"trajectory-every = {TrajectoryEvery}: expected >= 0");
        if (SamplerSteps.Problem(Sampler, Steps, timesteps) is { } problem) throw new ArgumentException(problem);
        if (!(Eta >= 0 && Eta <= 1)) throw new ArgumentException($"eta = {Eta}: expected a value in [0, 1]");
    }
}

/// <summary>Final samples [N, ...] (CPU) and, when asked, the kept trajectory frames x_T ... x_0 (CPU, each [N, ...]).</summary>
public sealed class SamplingResult : IDisposable
{
    public SamplingResult(Tensor samples, IReadOnlyList<Tensor> trajectory)
    {
        Samples = samples;
        Trajectory = trajectory;
    }

    public Tensor Samples { get; }
    public IReadOnlyList<Tensor> Trajectory { get; }

    public void Dispose()
    {
        Samples.Dispose();
        foreach (var t in Trajectory) t.Dispose();
    }
}

/// <summary>
/// Composes a denoising network with a <see cref="ReverseSampler"/>. Sample i's starting noise x_T and every
/// step's noise come from counter-based streams keyed by (seed, i), so a sample is the same whichever batch,
/// process or device computes it. Runs under no_grad with the network in eval mode.
/// </summary>
public static class SamplingPipeline
{
    /// <summary>The noise key of sample <paramref name="index"/> of stream <paramref name="seed"/>.</summary>
    public static ulong SampleKey(long seed, long index) => Randomness.SamplingChain(seed, index);

    /// <param name="defaultGuidance">the guidance scale when the request names none (the recipe's).</param>
    public static SamplingResult Run(DenoiserNetwork network, GaussianDiffusion diffusion, bool clipDenoised,
        SamplingRequest request, long[] sampleShape, Device device, int batchSize = 256,
        Action<int>? onSamplesDone = null, double defaultGuidance = 1, CancellationToken cancellationToken = default)
    {
        request.Validate(diffusion.T, network.Classes);
        var conditioning = request.Conditioning ?? ClassGuidance.Default;
        var scale = conditioning.Guidance ?? defaultGuidance;
        if (batchSize < 1) throw new ArgumentException($"batch size = {batchSize}: expected >= 1");
        var sampler = ReverseSampler.Create(diffusion, request.Sampler, request.Steps, request.Eta, clipDenoised);
        TorchRuntime.UseIntraOpThreads(TorchRuntime.ConfiguredThreads);   // training work leaves its thread at one
        var wasTraining = network.training;
        network.eval();
        var outputs = new List<Tensor>();
        var trajectories = new List<List<Tensor>>();
        try
        {
            using var noGrad = no_grad();
            for (var start = 0; start < request.Count; start += batchSize)
            {
                var n = Math.Min(batchSize, request.Count - start);
                var keys = new ulong[n];
                for (var j = 0; j < n; j++) keys[j] = SampleKey(request.Seed, request.FirstIndex + start + j);
                var frames = new List<Tensor>();
                trajectories.Add(frames);   // before the run, so frames of a cancelled batch are disposed too
                var labels = network.Classes > 0 ? ClassifierFreeGuidance.Labels(conditioning, network.Classes, request.FirstIndex + start, n) : null;
                outputs.Add(RunBatch(network, sampler, keys, labels, scale, sampleShape, device, request.TrajectoryEvery, frames, cancellationToken));
                onSamplesDone?.Invoke(start + n);
            }
            var samples = outputs.Count == 1 ? outputs[0].alias() : cat(outputs, 0);
            var trajectory = new List<Tensor>();
            if (trajectories.Count > 0)
                for (var f = 0; f < trajectories[0].Count; f++)
                    trajectory.Add(cat(trajectories.Select(tr => tr[f]).ToList(), 0));
            return new SamplingResult(samples.DetachFromDisposeScope(), trajectory.Select(t => t.DetachFromDisposeScope()).ToList());
        }
        finally
        {
            foreach (var o in outputs) o.Dispose();
            foreach (var tr in trajectories) foreach (var f in tr) f.Dispose();
            network.train(wasTraining);
        }
    }

    /// <summary>A CPU copy that never aliases <paramref name="x"/> (x.cpu() returns x itself on the CPU).</summary>
    private static Tensor CpuCopy(Tensor x) =>
        (x.device_type == DeviceType.CPU ? x.clone() : x.cpu()).DetachFromDisposeScope();

    /// <summary>Runs the whole reverse chain for one batch of sample keys (and labels, class-conditional networks); returns x_0 [n, ...] on the CPU.</summary>
    private static Tensor RunBatch(DenoiserNetwork network, ReverseSampler sampler, ulong[] keys, long[]? labels, double guidance,
        long[] sampleShape, Device device, int trajectoryEvery, List<Tensor> frames, CancellationToken ct)
    {
        // x_T ~ N(0, I) from position 0 of each sample's stream; step k's noise from the stream keyed (key, k + 1).
        var x = CounterRng.NormalRows(keys, sampleShape, device).DetachFromDisposeScope();
        if (trajectoryEvery > 0) frames.Add(CpuCopy(x));
        var stepKeys = new ulong[keys.Length];
        try
        {
            for (var pos = 0; pos < sampler.Timesteps.Count; pos++)
            {
                ct.ThrowIfCancellationRequested();
                using var guard = TorchRuntime.Compute();   // temporaries outlive their native calls (see TorchRuntime)
                using var scope = NewDisposeScope();
                var t = full(new[] { (long)keys.Length }, (long)sampler.Timesteps[pos], ScalarType.Int64, device);
                var output = ClassifierFreeGuidance.Output(network, x, t, labels, guidance);
                Tensor? noise = null;
                if (sampler.UsesNoise(pos))
                {
                    for (var j = 0; j < keys.Length; j++) stepKeys[j] = Randomness.SamplingStepNoise(keys[j], pos);
                    noise = CounterRng.NormalRows(stepKeys, sampleShape, device);
                }
                var next = sampler.Step(output, pos, x, noise).DetachFromDisposeScope();
                x.Dispose();
                x = next;
                var last = pos == sampler.Timesteps.Count - 1;
                if (trajectoryEvery > 0 && ((pos + 1) % trajectoryEvery == 0 || last))
                    frames.Add(CpuCopy(x));
            }
            return x.cpu().DetachFromDisposeScope();
        }
        finally
        {
            x.Dispose();   // .cpu() made a new handle; a cancelled chain's x goes too
        }
    }
}
