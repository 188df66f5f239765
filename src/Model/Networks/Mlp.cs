using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Networks;

/// <summary>
/// MLP denoiser for points [B, D]: the sinusoidal embedding of t (TimeEmbeddingSize) is projected to
/// HiddenSize, then each of the HiddenLayers hidden layers sees [h, temb] (the time embedding is injected
/// into every layer): h_1 = ReLU(W_1 [x, temb]), h_l = ReLU(W_l [h_(l-1), temb]), followed by per-sample
/// dropout; a linear output gives [B, D] (or [B, 2D] with a learned variance).
/// </summary>
public sealed class Mlp : DenoiserNetwork
{
    private readonly long timeEmbeddingSize;
    private readonly Linear time_proj;
    private readonly ModuleList<Linear> hidden;
    private readonly ModuleList<SampleDropout> dropout;
    private readonly Linear output;

    internal Mlp(MlpOptions options, double dropoutRate, long[] dataShape, bool learnedVariance)
        : base(nameof(Mlp), dataShape, learnedVariance, dropoutRate)
    {
        var dim = dataShape[0];
        long width = options.HiddenSize;
        timeEmbeddingSize = options.TimeEmbeddingSize;
        time_proj = nn.Linear(timeEmbeddingSize, width);
        hidden = new ModuleList<Linear>();
        dropout = new ModuleList<SampleDropout>();
        for (var l = 0; l < options.HiddenLayers; l++)
        {
            hidden.Add(nn.Linear((l == 0 ? dim : width) + width, width));
            dropout.Add(NewDropout());
        }
        output = nn.Linear(width, learnedVariance ? 2 * dim : dim);
        RegisterComponents();
    }

    private protected override Tensor Denoise(Tensor x, Tensor t, Tensor? labels)
    {
        var temb = time_proj.forward(SinusoidalEmbedding.Embed(t, timeEmbeddingSize)).relu(); // [B, H]
        var h = x;                                                                          // [B, D]
        for (var l = 0; l < hidden.Count; l++)
            h = dropout[l].forward(hidden[l].forward(cat(new[] { h, temb }, 1)).relu());    // [B, H]
        return output.forward(h);                                                           // [B, D or 2D]
    }
}
