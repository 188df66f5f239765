using TorchSharp.Modules;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Networks;

/// <summary>
/// Sohl-Dickstein et al. (2015), "Deep Unsupervised Learning using Nonequilibrium Thermodynamics",
/// appendix D: the reverse-process mean and variance come from an MLP trunk shared across timesteps
/// (HiddenLayers ReLU layers of HiddenSize, no time input) and a separate linear readout per timestep.
/// The T readouts are one batched weight tensor head_weight [T, H, O] and bias head_bias [T, O],
/// gathered by t: y_i = h_i W[t_i] + b[t_i]. O = D, or 2D (mean and variance outputs) with a learned variance.
/// </summary>
public sealed class Sohl2015Mlp : DenoiserNetwork
{
    private readonly ModuleList<Linear> trunk;
    private readonly ModuleList<SampleDropout> dropout;
    private readonly Parameter head_weight;
    private readonly Parameter head_bias;

    internal Sohl2015Mlp(MlpOptions options, double dropoutRate, long[] dataShape, bool learnedVariance)
        : base(nameof(Sohl2015Mlp), dataShape, learnedVariance, dropoutRate)
    {
        var dim = dataShape[0];
        long width = options.HiddenSize;
        long outputs = learnedVariance ? 2 * dim : dim;
        trunk = new ModuleList<Linear>();
        dropout = new ModuleList<SampleDropout>();
        for (var l = 0; l < options.HiddenLayers; l++)
        {
            trunk.Add(nn.Linear(l == 0 ? dim : width, width));
            dropout.Add(NewDropout());
        }
        // Same initialization as T independent nn.Linear(width, outputs): U(-1/sqrt(H), 1/sqrt(H)).
        var bound = 1.0 / Math.Sqrt(width);
        using (no_grad())
        {
            head_weight = new Parameter(empty(options.Timesteps, width, outputs).uniform_(-bound, bound));
            head_bias = new Parameter(empty(options.Timesteps, outputs).uniform_(-bound, bound));
        }
        RegisterComponents();
    }

    /// <summary>Number of per-timestep readouts (the recipe's T).</summary>
    public long Timesteps => head_weight.shape[0];

    private protected override Tensor Denoise(Tensor x, Tensor t, Tensor? labels)
    {
        var h = x;                                                           // [B, D]
        for (var l = 0; l < trunk.Count; l++)
            h = dropout[l].forward(trunk[l].forward(h).relu());              // [B, H]
        var w = head_weight.index_select(0, t);                              // [B, H, O]
        var b = head_bias.index_select(0, t);                                // [B, O]
        return h.unsqueeze(1).bmm(w).squeeze(1).add(b);                      // [B, O]
    }
}
