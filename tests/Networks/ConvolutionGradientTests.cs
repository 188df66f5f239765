using DistDiffusion.Model;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Networks;

/// <summary>
/// Regression test for the oneDNN AVX-512 convolution backward bug (see <see cref="TorchRuntime"/>):
/// with the runtime settings in force, the input gradient of small 3x3 convolutions is finite and the
/// same every time. Without the ISA cap this fails on the machines this project is developed on.
/// </summary>
public class ConvolutionGradientTests
{
    [Fact]
    public void ConvolutionInputGradientsAreFiniteAndRepeatable()
    {
        Assert.NotNull(TorchRuntime.OneDnnIsaCap);
        var failures = new List<string>();
        foreach (var c in new[] { 2, 4, 8, 12, 28 })
            foreach (var (b, side) in new[] { (6, 14), (32, 28), (2, 32) })
            {
                using var scope = NewDisposeScope();
                random.manual_seed(c * 100 + b);
                var conv = nn.Conv2d(c, c, 3, padding: 1);
                var x0 = randn(b, c, side, side);
                Tensor? first = null;
                for (var i = 0; i < 15; i++)
                {
                    var x = x0.clone().requires_grad_(true);
                    conv.forward(x).square().mean().backward();
                    var g = x.grad!;
                    if (g.isnan().any().item<bool>()) { failures.Add($"c{c} b{b} {side}px: NaN gradient"); break; }
                    first ??= g.clone();
                    if (!g.allclose(first, 1e-5, 1e-7)) { failures.Add($"c{c} b{b} {side}px: gradient changed between identical calls"); break; }
                }
            }
        Assert.True(failures.Count == 0, $"oneDNN ISA cap {TorchRuntime.OneDnnIsaCap}: " + string.Join("; ", failures));
    }
}
