using static TorchSharp.torch;

namespace DistDiffusion.Model.Networks;

/// <summary>
/// Transformer sinusoidal position embedding of the timestep (Vaswani et al. 2017), as in Ho et al.'s
/// <c>get_timestep_embedding</c> and the annotated diffusion model's <c>SinusoidalPositionEmbeddings</c>:
/// freq_j = exp(-ln(10000) j / (half - 1)), emb = [sin(t freq), cos(t freq)] (zero-padded when dim is odd).
/// </summary>
internal static class SinusoidalEmbedding
{
    /// <summary>t [B] (any numeric dtype) -> [B, dim] float32 on t's device.</summary>
    public static Tensor Embed(Tensor t, long dim)
    {
        var half = dim / 2;
        using var scope = NewDisposeScope();
        var scale = Math.Log(10000.0) / Math.Max(half - 1, 1);
        var freqs = arange(half, dtype: ScalarType.Float32, device: t.device).mul(-scale).exp(); // [half]
        var args = t.to(ScalarType.Float32).unsqueeze(1).mul(freqs.unsqueeze(0));               // [B, half]
        var emb = cat(new[] { args.sin(), args.cos() }, 1);                                      // [B, 2 half]
        if (dim % 2 == 1)
            emb = nn.functional.pad(emb, new long[] { 0, 1 });
        return emb.MoveToOuterDisposeScope();
    }
}
