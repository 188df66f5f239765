using System.Numerics;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Optimization;

/// <summary>How the learning rate moves after the warm-up.</summary>
public enum LearningRateDecay
{
    /// <summary>The recipe's rate from the end of the warm-up on.</summary>
    None,
    /// <summary>
    /// Half a cosine from the recipe's rate at the end of the warm-up down to min-learning-rate at the run's last step
    /// (Loshchilov &amp; Hutter 2017, SGDR without restarts; diffusers' get_cosine_schedule_with_warmup).
    /// </summary>
    Cosine,
}

/// <summary>
/// The optimizer's settings (the recipe's learning-rate, adam-beta1/2, adam-epsilon, weight-decay, grad-clip, warmup-steps,
/// learning-rate-decay and min-learning-rate; <see cref="Recipe.ToAdamOptions"/>). <paramref name="TotalSteps"/> is the run's
/// last step, where a decay ends.
/// </summary>
public sealed record AdamOptions(double LearningRate, double Beta1, double Beta2, double Epsilon, double WeightDecay, double GradClip, int WarmupSteps,
    LearningRateDecay Decay = LearningRateDecay.None, double MinLearningRate = 0, long TotalSteps = 0);

/// <summary>
/// Adam (Kingma &amp; Ba 2015) with bias correction, as torch.optim.Adam computes it, plus decoupled weight
/// decay (AdamW), global-norm gradient clipping and linear warm-up. Its state (exp_avg, exp_avg_sq per
/// parameter and the step count) is explicit so that checkpoints can store and restore it exactly.
/// The gradients are read from each parameter's .grad (set by backward or by the distributed trainer).
/// </summary>
public sealed class AdamOptimizer : IDisposable
{
    private readonly List<(string Name, Parameter Param)> _params;
    private readonly Dictionary<string, Tensor> _expAvg = new();
    private readonly Dictionary<string, Tensor> _expAvgSq = new();
    private readonly long _elements;
    /// <summary>Each parameter's first element in the flat vector of <see cref="Step(Span{float}, ReadOnlySpan{byte}, Span{float}, ParameterUpdated)"/> (named_parameters order).</summary>
    private readonly long[] _offsets;
    /// <summary>Flat steps: the parameters that have had a gradient (what a .grad kept, zeroed, between steps is to <see cref="Step()"/>).</summary>
    private readonly bool[] _hadFlatGradient;

    public double LearningRate { get; }
    public double Beta1 { get; }
    public double Beta2 { get; }
    public double Epsilon { get; }
    public double WeightDecay { get; }
    public double GradClip { get; }
    public int WarmupSteps { get; }
    public LearningRateDecay Decay { get; }
    public double MinLearningRate { get; }
    public long TotalSteps { get; }

    /// <summary>Number of optimizer steps taken so far.</summary>
    public long StepCount { get; private set; }

    public AdamOptimizer(IEnumerable<(string Name, Parameter Param)> parameters, AdamOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        _params = parameters.ToList();
        LearningRate = options.LearningRate;
        Beta1 = options.Beta1;
        Beta2 = options.Beta2;
        Epsilon = options.Epsilon;
        WeightDecay = options.WeightDecay;
        GradClip = options.GradClip;
        WarmupSteps = options.WarmupSteps;
        Decay = options.Decay;
        MinLearningRate = options.MinLearningRate;
        TotalSteps = options.TotalSteps;
        _elements = _params.Sum(p => p.Param.numel());
        _offsets = new long[_params.Count];
        for (var i = 1; i < _params.Count; i++) _offsets[i] = _offsets[i - 1] + _params[i - 1].Param.numel();
        _hadFlatGradient = new bool[_params.Count];
        foreach (var (name, p) in _params)
        {
            _expAvg[name] = zeros_like(p).DetachFromDisposeScope();
            _expAvgSq[name] = zeros_like(p).DetachFromDisposeScope();
        }
    }

    /// <summary>
    /// Threads that update parameters side by side (each parameter's ops on one thread). The distributed coordinator,
    /// whose workers are idle while it updates and whose own torch work is single-threaded, uses its cores this way
    /// (per-op thread wake-ups made intra-op threads no faster on these small tensors); 1 (default) updates in order.
    /// </summary>
    public int UpdateThreads
    {
        get => _updateThreads;
        set => _updateThreads = value >= 1 ? value : throw new ArgumentOutOfRangeException(nameof(value), value, "expected at least 1 thread");
    }

    private int _updateThreads = 1;

    /// <summary>
    /// The learning rate used at optimizer step number <paramref name="step"/> (1-based): linear warm-up to the recipe's rate
    /// over the warm-up steps, then constant or, for <see cref="LearningRateDecay.Cosine"/>,
    /// lr_min + (lr - lr_min) (1 + cos(pi p)) / 2 with p = (step - warm-up) / (total - warm-up) clamped to [0, 1].
    /// Computed in double from the step number alone, so a resumed run continues on the same curve.
    /// </summary>
    public double LearningRateAt(long step)
    {
        if (WarmupSteps > 0 && step < WarmupSteps)
            return LearningRate * ((double)step / WarmupSteps);   // the same bits as before decays existed
        if (Decay == LearningRateDecay.None || TotalSteps <= WarmupSteps)
            return LearningRate;
        var progress = Math.Clamp((double)(step - WarmupSteps) / (TotalSteps - WarmupSteps), 0.0, 1.0);
        return MinLearningRate + (LearningRate - MinLearningRate) * 0.5 * (1.0 + Math.Cos(Math.PI * progress));
    }

    /// <summary>
    /// Global L2 norm of the current gradients (parameters without a gradient count as zero), summed in double in a fixed
    /// order on the CPU: libtorch's reductions split by thread count, and a clipping scale that differed in its last bit
    /// between `train` (2 threads) and the coordinator (1) would break the bitwise guarantee.
    /// </summary>
    public double GradientNorm()
    {
        using var scope = NewDisposeScope();
        var total = 0.0;
        foreach (var (_, p) in _params)
        {
            if (p.grad is not { } g) continue;
            var cpu = g.device_type == DeviceType.CPU ? g.contiguous() : g.cpu().contiguous();
            total += VectorMath.SumOfSquares(FloatTensors.Values(cpu));
        }
        return Math.Sqrt(total);
    }

    /// <summary>One update from the parameters' gradients. Returns the gradient norm before clipping.</summary>
    public double Step()
    {
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        var norm = GradientNorm();
        var c = NextUpdate(norm);
        // Every scalar operand of the tensor-op path is created here and held by `using` until the loop is done.
        // TorchSharp 0.107's Scalar has a finalizer and is not kept alive across the native call it is passed to: an
        // implicit double -> Scalar temporary can be finalized (freed) by a GC on another thread while libtorch still reads
        // it ("Unknown scalar type"), which the coordinator, whose gRPC threads allocate constantly, hit within a few
        // hundred steps under load. The element loop needs none.
        using var beta1 = Beta1.ToScalar();
        using var oneMinusBeta1 = (1 - Beta1).ToScalar();
        using var beta2 = Beta2.ToScalar();
        using var oneMinusBeta2 = (1 - Beta2).ToScalar();
        using var decay = c.DecayFactor.ToScalar();
        using var sqrtBias2 = c.SqrtBias2Factor.ToScalar();
        using var epsilon = Epsilon.ToScalar();
        using var negativeStep = c.NegativeStepSize.ToScalar();
        using var clip = c.ClipScale.ToScalar();
        void Update(int i)
        {
            using var inner = NewDisposeScope();
            using var noGrad2 = no_grad();
            var (name, p) = _params[i];
            if (p.grad is not { } grad) return;
            var m = _expAvg[name];
            var v = _expAvgSq[name];
            if (!UseTensorOps && FloatTensors.InPlace(p) && FloatTensors.InPlace(grad) && FloatTensors.InPlace(m) && FloatTensors.InPlace(v))
            {
                UpdateElements(FloatTensors.Values(p), FloatTensors.Values(grad), FloatTensors.Values(m), FloatTensors.Values(v), c.Elements);
                return;
            }
            TorchRuntime.UseIntraOpThreads(1);   // the same bits on any thread, in any process
            var g = c.ClipScale != 1.0 ? grad.mul(clip) : grad;
            m.mul_(beta1).add_(g, alpha: oneMinusBeta1);
            v.mul_(beta2).addcmul_(g, g, value: oneMinusBeta2);
            if (WeightDecay > 0) p.mul_(decay);
            var denom = v.sqrt().div_(sqrtBias2).add_(epsilon);
            p.addcdiv_(m, denom, value: negativeStep);
        }
        ForEachParameter(Update);
        return norm;
    }

    /// <summary>
    /// Whether <see cref="Step(Span{float}, ReadOnlySpan{byte}, Span{float}, ParameterUpdated)"/> applies: every parameter and moment a
    /// contiguous float32 tensor in CPU memory, and the element loop not turned off by <see cref="UseTensorOps"/>.
    /// </summary>
    public bool CanStepFlat => !UseTensorOps && _params.All(p => FloatTensors.InPlace(p.Param) && FloatTensors.InPlace(_expAvg[p.Name]) && FloatTensors.InPlace(_expAvgSq[p.Name]));

    /// <summary>
    /// One update from a flat gradient [Elements] in named_parameters order (the distributed coordinator's summed slices),
    /// without going through .grad: the same bits as writing it into the gradients of the parameters marked in
    /// <paramref name="present"/> and calling <see cref="Step()"/>, whose zeroed .grad keeps a parameter in the update
    /// once it has had a gradient (so does this). A parameter not marked has a zero gradient (its range is cleared). The
    /// parameters after the update are written into <paramref name="updated"/> [Elements] as well, each right after its
    /// update while still in cache, for the broadcast. No copy into .grad, no .grad to zero, no read of the parameters
    /// back. <paramref name="updatedParameter"/>, if given, sees each parameter's new values at the same moment (the EMA
    /// update reads them there instead of in a pass of its own). Returns the gradient norm before clipping; a non-finite
    /// one throws before anything changes.
    /// </summary>
    public unsafe double Step(Span<float> gradient, ReadOnlySpan<byte> present, Span<float> updated, ParameterUpdated? updatedParameter = null)
    {
        if (gradient.Length != _elements || updated.Length != _elements)
            throw new ArgumentException($"flat step over {_elements} parameters with a gradient of {gradient.Length} and an output of {updated.Length} elements");
        if (!CanStepFlat)
            throw new InvalidOperationException("a flat step needs contiguous float32 CPU tensors and the element loop (CanStepFlat)");
        using var scope = NewDisposeScope();
        var takesPart = new bool[_params.Count];
        var total = 0.0;
        for (var i = 0; i < _params.Count; i++)
        {
            var g = gradient.Slice((int)_offsets[i], (int)_params[i].Param.numel());
            var marked = VectorMath.IsPresent(present, i);
            if (!marked) g.Clear();
            takesPart[i] = marked || _hadFlatGradient[i];
            // GradientNorm's order and per-parameter sums: the same double, bit for bit.
            if (takesPart[i]) total += VectorMath.SumOfSquares(g);
        }
        var norm = Math.Sqrt(total);
        var c = NextUpdate(norm);
        takesPart.CopyTo(_hadFlatGradient, 0);
        fixed (float* gradientStart = gradient, updatedStart = updated)
        {
            // Addresses, not spans, cross into the (possibly parallel) per-parameter update; both stay pinned until it returns.
            var gradientAt = (nint)gradientStart;
            var updatedAt = (nint)updatedStart;
            void Update(int i)
            {
                using var inner = NewDisposeScope();
                var (name, p) = _params[i];
                var count = (int)p.numel();
                var values = FloatTensors.Values(p);
                if (takesPart[i])
                    UpdateElements(values, new ReadOnlySpan<float>((float*)gradientAt + _offsets[i], count), FloatTensors.Values(_expAvg[name]), FloatTensors.Values(_expAvgSq[name]), c.Elements);
                values.CopyTo(new Span<float>((float*)updatedAt + _offsets[i], count));
                updatedParameter?.Invoke(name, values);
            }
            ForEachParameter(Update);
        }
        return norm;
    }

    /// <summary>
    /// The constants of the next update (and the step count advanced to it), from the gradient norm before clipping: a
    /// non-finite norm throws first and changes nothing.
    /// </summary>
    private UpdateConstants NextUpdate(double norm)
    {
        if (!double.IsFinite(norm))
            throw new NonFiniteGradientException(norm);
        var clipScale = GradClip > 0 && norm > GradClip ? GradClip / (norm + 1e-6) : 1.0;
        StepCount++;
        var lr = LearningRateAt(StepCount);
        var stepSize = lr / (1.0 - Math.Pow(Beta1, StepCount));
        var sqrtBias2 = Math.Sqrt(1.0 - Math.Pow(Beta2, StepCount));
        var decay = 1 - lr * WeightDecay;
        return new UpdateConstants(clipScale, decay, sqrtBias2, -stepSize,
            new ElementUpdate((float)clipScale, (float)Beta1, (float)(1 - Beta1), (float)Beta2, (float)(1 - Beta2),
                (float)decay, (float)sqrtBias2, (float)Epsilon, (float)-stepSize, WeightDecay > 0));
    }

    // Each parameter's update is the same sequence of element-wise float32 operations whichever thread runs it: the
    // same bits. The element loop takes ~0.3 ms for the swiss roll's 477,442 parameters, so it runs in order below
    // a million elements (waking threads would cost more than it saves).
    private void ForEachParameter(Action<int> update)
    {
        if (UpdateThreads > 1 && (UseTensorOps || _elements >= 1 << 20))
            Parallel.For(0, _params.Count, new ParallelOptions { MaxDegreeOfParallelism = UpdateThreads }, update);
        else for (var i = 0; i < _params.Count; i++) update(i);
    }

    /// <summary>One update's constants in double (the tensor-op path's scalars) and rounded to float32 (the element loop's).</summary>
    private readonly record struct UpdateConstants(double ClipScale, double DecayFactor, double SqrtBias2Factor, double NegativeStepSize, ElementUpdate Elements);

    /// <summary>
    /// Updates through libtorch's ops even where the element loop applies (tests compare the two paths; tensors on an
    /// accelerator always take this path).
    /// </summary>
    public bool UseTensorOps { get; init; }

    /// <summary>The per-step constants of <see cref="UpdateElements"/>, rounded to float32 as libtorch rounds its scalars for float tensors.</summary>
    private readonly record struct ElementUpdate(float Clip, float Beta1, float OneMinusBeta1, float Beta2, float OneMinusBeta2,
        float Decay, float SqrtBias2, float Epsilon, float NegativeStep, bool Decays);

    /// <summary>
    /// One Adam update of one parameter in a single pass over its memory, element by element in float32 and in the
    /// order of the tensor-op path (Kingma &amp; Ba 2015, Algorithm 1, with torch.optim.Adam's bias correction and AdamW's
    /// decoupled decay): g <- g c; m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2; p <- decay p;
    /// p <- p - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps). Spans: p, g, m, v [n]. No fused multiply-add:
    /// every operation rounds once, so the bits do not depend on the vector width or on which elements the tail handles.
    /// </summary>
    private static void UpdateElements(Span<float> p, ReadOnlySpan<float> g, Span<float> m, Span<float> v, in ElementUpdate c)
    {
        var n = p.Length;
        if (g.Length != n || m.Length != n || v.Length != n)
            throw new ArgumentException($"Adam update over {n} parameters with {g.Length} gradients, {m.Length} and {v.Length} moments");
        var i = 0;
        if (Vector.IsHardwareAccelerated && n >= Vector<float>.Count)
        {
            var pv = System.Runtime.InteropServices.MemoryMarshal.Cast<float, Vector<float>>(p);
            var gv = System.Runtime.InteropServices.MemoryMarshal.Cast<float, Vector<float>>(g);
            var mv = System.Runtime.InteropServices.MemoryMarshal.Cast<float, Vector<float>>(m);
            var vv = System.Runtime.InteropServices.MemoryMarshal.Cast<float, Vector<float>>(v);
            Vector<float> clip = new(c.Clip), b1 = new(c.Beta1), a1 = new(c.OneMinusBeta1), b2 = new(c.Beta2), a2 = new(c.OneMinusBeta2),
                decay = new(c.Decay), sqrtBias2 = new(c.SqrtBias2), eps = new(c.Epsilon), step = new(c.NegativeStep);
            var clipped = c.Clip != 1f;
            for (var k = 0; k < pv.Length; k++)
            {
                var gk = clipped ? gv[k] * clip : gv[k];
                var mk = mv[k] * b1 + gk * a1;
                var vk = vv[k] * b2 + gk * gk * a2;
                mv[k] = mk;
                vv[k] = vk;
                var pk = c.Decays ? pv[k] * decay : pv[k];
                pv[k] = pk + step * (mk / (Vector.SquareRoot(vk) / sqrtBias2 + eps));
            }
            i = pv.Length * Vector<float>.Count;
        }
        for (; i < n; i++)
        {
            var gi = c.Clip != 1f ? g[i] * c.Clip : g[i];
            var mi = m[i] * c.Beta1 + gi * c.OneMinusBeta1;
            var vi = v[i] * c.Beta2 + gi * gi * c.OneMinusBeta2;
            m[i] = mi;
            v[i] = vi;
            var pi = c.Decays ? p[i] * c.Decay : p[i];
            p[i] = pi + c.NegativeStep * (mi / (MathF.Sqrt(vi) / c.SqrtBias2 + c.Epsilon));
        }
    }

    /// <summary>Clears every parameter's gradient.</summary>
    public void ZeroGrad()
    {
        // Each .grad access wraps the gradient in a new Tensor object: let the scope release the wrappers.
        using var scope = NewDisposeScope();
        foreach (var (_, p) in _params)
            if (p.grad is { } g) g.zero_();
    }

    /// <summary>State tensors by name ("exp_avg.{param}", "exp_avg_sq.{param}"), live references.</summary>
    public IReadOnlyDictionary<string, Tensor> StateTensors()
    {
        var d = new Dictionary<string, Tensor>();
        foreach (var (name, _) in _params)
        {
            d["exp_avg." + name] = _expAvg[name];
            d["exp_avg_sq." + name] = _expAvgSq[name];
        }
        return d;
    }

    /// <summary>Restores state saved by <see cref="StateTensors"/>; every tensor must be present with the parameter's shape.</summary>
    public void LoadState(IReadOnlyDictionary<string, Tensor> state, long stepCount)
    {
        // Validate everything first so a bad state changes nothing.
        foreach (var (name, p) in _params)
            foreach (var prefix in new[] { "exp_avg.", "exp_avg_sq." })
            {
                if (!state.TryGetValue(prefix + name, out var t))
                    throw new InvalidDataException($"optimizer state lacks '{prefix}{name}'");
                if (!t.shape.SequenceEqual(p.shape))
                    throw new InvalidDataException($"optimizer state '{prefix}{name}' has shape [{string.Join(",", t.shape)}], expected [{string.Join(",", p.shape)}]");
            }
        using var noGrad = no_grad();
        foreach (var (name, _) in _params)
        {
            _expAvg[name].copy_(state["exp_avg." + name]);
            _expAvgSq[name].copy_(state["exp_avg_sq." + name]);
        }
        StepCount = stepCount;
    }

    public void Dispose()
    {
        foreach (var t in _expAvg.Values) t.Dispose();
        foreach (var t in _expAvgSq.Values) t.Dispose();
        _expAvg.Clear();
        _expAvgSq.Clear();
    }
}

/// <summary>Called with a parameter's name and its values [numel] right after the optimizer's flat step updated them.</summary>
public delegate void ParameterUpdated(string name, ReadOnlySpan<float> values);

/// <summary>
/// The gradient's global norm is not finite: nothing was applied (thrown before any tensor changes), so the training state
/// is still the last completed step's. The distributed coordinator treats it as divergence.
/// </summary>
public sealed class NonFiniteGradientException(double norm)
    : InvalidOperationException($"gradient norm is {norm}: refusing to apply a non-finite update")
{
    public double Norm { get; } = norm;
}
