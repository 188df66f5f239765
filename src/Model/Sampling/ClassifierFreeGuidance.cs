using System.Globalization;
using DistDiffusion.Model.Networks;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Sampling;

/// <summary>
/// What a class-conditional model is asked to sample: <see cref="Class"/> null draws the classes in turn (sample i of a
/// request is class i mod classes, so a sample's class, like its noise, depends on its index alone), else every sample is
/// that class; <see cref="Guidance"/> null uses the recipe's guidance scale. Unconditional models take only the default.
/// </summary>
public sealed record ClassGuidance(int? Class = null, double? Guidance = null)
{
    public static ClassGuidance Default { get; } = new();

    /// <summary>What is wrong with this request for a network of <paramref name="classes"/> classes (0: unconditional), or null.</summary>
    public string? Problem(int classes)
    {
        var inv = CultureInfo.InvariantCulture;
        if (Guidance is { } g && !(double.IsFinite(g) && g >= 0))
            return string.Create(inv, $"guidance = {g}: expected a finite value >= 0 (1: no guidance, 0: the unconditional model)");
        if (classes == 0)
        {
            if (Class is { } c0) return string.Create(inv, $"class = {c0}: this model is unconditional (recipe field classes = 0); expected no class");
            if (Guidance is { } g0 && g0 != 1) return string.Create(inv, $"guidance = {g0}: this model is unconditional (recipe field classes = 0); expected 1 or none");
            return null;
        }
        if (Class is { } c && (c < 0 || c >= classes)) return string.Create(inv, $"class = {c}: expected 0..{classes - 1}, or none for the classes in turn");
        return null;
    }

    /// <summary>The class label of sample <paramref name="index"/> of the request.</summary>
    public long Label(long index, int classes) => Class ?? index % classes;

    public string Describe(int classes, double recipeGuidance) =>
        classes == 0 ? "unconditional"
        : string.Create(CultureInfo.InvariantCulture, $"{(Class is { } c ? $"class {c}" : $"classes 0..{classes - 1} in turn")}, guidance {Guidance ?? recipeGuidance}");
}

/// <summary>
/// Classifier-free guidance (Ho &amp; Salimans 2022, eq. 6 in diffusers' form): out = out(x_t, no label) + s (out(x_t, c) -
/// out(x_t, no label)). s = 1 is the conditional model alone and s = 0 the unconditional one (one network pass each); any
/// other s runs the batch twice in one pass, [x_t; x_t] with labels [c; no label]. The guided output is the prediction
/// (epsilon, x0 or v: all linear in the score); a learned variance half (dim 1) is the conditional model's.
/// </summary>
public static class ClassifierFreeGuidance
{
    /// <summary>The labels [n] of samples firstIndex..+n of a request.</summary>
    public static long[] Labels(ClassGuidance guidance, int classes, long firstIndex, int n)
    {
        var labels = new long[n];
        for (var j = 0; j < n; j++) labels[j] = guidance.Label(firstIndex + j, classes);
        return labels;
    }

    /// <summary>
    /// The network output for x [n, ...] at t [n]: unconditional networks (<paramref name="labels"/> null) as they are,
    /// class-conditional ones guided with scale <paramref name="scale"/>. Returns [n, C or 2C, ...] like forward.
    /// </summary>
    public static Tensor Output(DenoiserNetwork network, Tensor x, Tensor t, long[]? labels, double scale)
    {
        if (network.Classes == 0 || labels is null)
        {
            if (labels is not null || network.Classes > 0)
                throw new ArgumentException($"labels {(labels is null ? "missing" : "given")} for a network with classes = {network.Classes}");
            return network.forward(x, t);
        }
        var n = labels.Length;
        if (scale == 1 || scale == 0)
        {
            network.SetClassLabels(scale == 1 ? labels : Enumerable.Repeat(network.NullLabel, n).ToArray());
            try { return network.forward(x, t); }
            finally { network.SetClassLabels(null); }
        }
        var both = new long[2 * n];
        labels.CopyTo(both, 0);
        Array.Fill(both, network.NullLabel, n, n);
        Tensor output;
        network.SetClassLabels(both);
        try { output = network.forward(cat([x, x], 0), cat([t, t], 0)); }                        // [2n, C or 2C, ...]
        finally { network.SetClassLabels(null); }
        using var scope = NewDisposeScope();
        using var _ = output;
        var conditional = output.narrow(0, 0, n);
        var unconditional = output.narrow(0, n, n);
        var channels = x.shape[1];
        var guided = unconditional.narrow(1, 0, channels) + scale * (conditional.narrow(1, 0, channels) - unconditional.narrow(1, 0, channels));
        var result = network.LearnedVariance ? cat([guided, conditional.narrow(1, channels, channels)], 1) : guided;
        return result.MoveToOuterDisposeScope();
    }
}
