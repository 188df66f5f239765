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

    public void Update(long step)
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        TorchRuntime.UseIntraOpThreads(1);   // element-wise bits follow the thread count: the same everywhere
        var d = DecayAt(step);
        // Scalars held alive across the native calls (see AdamOptimizer.Step).
        using var decay = d.ToScalar();
        using var oneMinusDecay = (1 - d).ToScalar();
        foreach (var (name, p) in _params)
            _shadow[name].mul_(decay).add_(p, alpha: oneMinusDecay);
    }

    public IReadOnlyDictionary<string, Tensor> Weights => _shadow;

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
