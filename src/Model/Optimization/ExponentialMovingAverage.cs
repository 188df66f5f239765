using System.Numerics;
using System.Runtime.InteropServices;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Optimization;

/// <summary>
/// EMA of the weights: ema = d ema + (1 - d) theta after each optimizer step, with the warm-up
/// d_k = min(decay, (1 + k) / (10 + k)) so short runs are not dominated by the initial weights.
/// Sampling uses the EMA weights by default (Ho et al. use decay 0.9999).
/// </summary>
public sealed class ExponentialMovingAverage : IDisposable
{
    private readonly IReadOnlyList<(string Name, Parameter Param)> _params;
    private readonly Dictionary<string, Tensor> _shadow = new();

    public double Decay { get; }

    public ExponentialMovingAverage(IEnumerable<(string Name, Parameter Param)> parameters, double decay)
    {
        _params = parameters.ToList();
        Decay = decay;
        using var noGrad = no_grad();
        foreach (var (name, p) in _params) _shadow[name] = p.detach().clone().DetachFromDisposeScope();
    }

    /// <summary>The decay used after optimizer step number <paramref name="step"/> (1-based).</summary>
    public double DecayAt(long step) => Math.Min(Decay, (1.0 + step) / (10.0 + step));

    /// <summary>
    /// Updates through libtorch's ops even where the element loop applies (tests compare the two paths; tensors on an
    /// accelerator always take this path).
    /// </summary>
    public bool UseTensorOps { get; init; }

    /// <summary>
    /// ema <- d ema + (1 - d) theta with d = <see cref="DecayAt"/>(<paramref name="step"/>). On CPU float32 tensors one
    /// pass over each parameter's memory (<see cref="UpdateParameter"/>) instead of two libtorch ops per parameter, each
    /// a dispatch and a pass of its own.
    /// </summary>
    public void Update(long step)
    {
        if (CanUpdateInPlace)
        {
            var factors = FactorsAt(step);
            foreach (var (name, p) in _params) UpdateParameter(name, FloatTensors.Values(p), factors);
            return;
        }
        var d = DecayAt(step);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        TorchRuntime.UseIntraOpThreads(1);   // element-wise bits follow the thread count: the same everywhere
        // Scalars held alive across the native calls (see AdamOptimizer.Step).
        using var decay = d.ToScalar();
        using var oneMinusDecay = (1 - d).ToScalar();
        foreach (var (name, p) in _params)
            _shadow[name].mul_(decay).add_(p, alpha: oneMinusDecay);
    }

    public IReadOnlyDictionary<string, Tensor> Weights => _shadow;

    /// <summary>Whether the EMA updates by the element loop: every parameter and shadow a contiguous float32 CPU tensor, and <see cref="UseTensorOps"/> off.</summary>
    public bool CanUpdateInPlace => !UseTensorOps && _params.All(p => FloatTensors.InPlace(p.Param) && FloatTensors.InPlace(_shadow[p.Name]));

    /// <summary>d and 1 - d after optimizer step <paramref name="step"/>, rounded to float32 as libtorch rounds its scalars for float tensors.</summary>
    public EmaFactors FactorsAt(long step)
    {
        var d = DecayAt(step);
        return new((float)d, (float)(1 - d));
    }

    /// <summary>
    /// One parameter's part of <see cref="Update"/> (where <see cref="CanUpdateInPlace"/>) from its new values
    /// <paramref name="theta"/> [numel], for a caller that has them in cache: the optimizer's flat step calls it right
    /// after updating each parameter. The same element loop as <see cref="Update"/>, so the same bits.
    /// </summary>
    public void UpdateParameter(string name, ReadOnlySpan<float> theta, EmaFactors factors)
    {
        if (!_shadow.TryGetValue(name, out var shadow))
            throw new ArgumentException($"the EMA has no weight '{name}'", nameof(name));
        UpdateElements(FloatTensors.Values(shadow), theta, factors.Keep, factors.Take);
    }

    /// <summary>
    /// e <- e keep + theta take, element by element in float32 in the order of the tensor-op path (mul_, then add_ with
    /// alpha). Spans: e, theta [n]. No fused multiply-add: every operation rounds once, so the bits depend neither on
    /// the vector width nor on which elements the tail handles.
    /// </summary>
    private static void UpdateElements(Span<float> e, ReadOnlySpan<float> theta, float keep, float take)
    {
        var n = e.Length;
        if (theta.Length != n)
            throw new ArgumentException($"EMA update over {n} weights with {theta.Length} parameters");
        var i = 0;
        if (Vector.IsHardwareAccelerated && n >= Vector<float>.Count)
        {
            var ev = MemoryMarshal.Cast<float, Vector<float>>(e);
            var tv = MemoryMarshal.Cast<float, Vector<float>>(theta);
            Vector<float> k = new(keep), a = new(take);
            for (var j = 0; j < ev.Length; j++) ev[j] = ev[j] * k + tv[j] * a;
            i = ev.Length * Vector<float>.Count;
        }
        for (; i < n; i++) e[i] = e[i] * keep + theta[i] * take;
    }

    /// <summary>Replaces the shadow weights (all names and shapes are checked before anything changes).</summary>
    public void Load(IReadOnlyDictionary<string, Tensor> weights)
    {
        foreach (var (name, p) in _params)
        {
            if (!weights.TryGetValue(name, out var t))
                throw new InvalidDataException($"EMA weights lack '{name}'");
            if (!t.shape.SequenceEqual(p.shape))
                throw new InvalidDataException($"EMA weight '{name}' has shape [{string.Join(",", t.shape)}], expected [{string.Join(",", p.shape)}]");
        }
        using var noGrad = no_grad();
        foreach (var (name, _) in _params) _shadow[name].copy_(weights[name]);
    }

    public void Dispose()
    {
        foreach (var t in _shadow.Values) t.Dispose();
        _shadow.Clear();
    }
}

/// <summary>One EMA update's factors in float32: ema <- Keep ema + Take theta (Keep = d, Take = 1 - d).</summary>
public readonly record struct EmaFactors(float Keep, float Take);
