using DistDiffusion.Model.Networks;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Networks;

public class TrainingStepTests
{
    public static TheoryData<string> Networks => new() { "mlp", "sohl2015", "unet-annotated", "unet-ho2020" };

    private static (DenoiserNetwork Net, long[] Shape) Build(string name, double dropout = 0.1) => name switch
    {
        "mlp" => (NetworkFactory.Create(TestNetworks.Mlp(NetworkKind.Mlp, dropout, learnedVariance: true).ToNetworkOptions(), [2]), [2]),
        "sohl2015" => (NetworkFactory.Create(TestNetworks.Mlp(NetworkKind.Sohl2015Mlp, dropout, learnedVariance: true).ToNetworkOptions(), [2]), [2]),
        "unet-annotated" => (NetworkFactory.Create(TestNetworks.UNet(UNetLayout.Annotated, [1, 2], dropout, learnedVariance: true).ToNetworkOptions(), [1, 8, 8]), [1, 8, 8]),
        "unet-ho2020" => (NetworkFactory.Create(TestNetworks.UNet(UNetLayout.Ho2020, [1, 2], dropout, learnedVariance: true, attention: [8, 4]).ToNetworkOptions(), [1, 8, 8]), [1, 8, 8]),
        _ => throw new ArgumentException(name),
    };

    private static void Step(DenoiserNetwork net, long[] shape, long seed)
    {
        using var scope = NewDisposeScope();
        var (x, t) = TestNetworks.Inputs(3, shape, seed);
        net.SetSampleSeeds([seed, seed + 1, seed + 2]);
        var loss = net.forward(x, t).square().mean();
        loss.backward();
    }

    [Theory]
    [MemberData(nameof(Networks))]
    public void ForwardBackwardLeaksNoTensors(string name)
    {
        var (net, shape) = Build(name);
        using var _ = net;
        net.train();
        Step(net, shape, 1); // creates the .grad tensors
        var stats = DisposeScopeManager.Statistics;
        var before = stats.ThreadTotalLiveCount;
        for (var i = 0; i < 3; i++)
        {
            net.zero_grad();
            Step(net, shape, 10 * i);
        }
        Assert.Equal(before, stats.ThreadTotalLiveCount);
    }

    [Theory]
    [MemberData(nameof(Networks))]
    public void EveryParameterGetsAGradient(string name)
    {
        var (net, shape) = Build(name);
        using var _ = net;
        net.train();
        Step(net, shape, 5);
        var missing = net.named_parameters().Where(p => p.parameter.grad is null).Select(p => p.name).ToArray();
        Assert.Empty(missing);
        Assert.NotEmpty(net.named_parameters());
    }

    [Fact]
    public void Sohl2015HeadsOnlyLearnFromTheirTimesteps()
    {
        var (net, _) = Build("sohl2015");
        using var __ = net;
        using var scope = NewDisposeScope();
        net.eval();
        var x = randn(3, 2);
        var t = tensor(new long[] { 2, 5, 5 });
        net.forward(x, t).square().sum().backward();
        var headGrad = net.named_parameters().Single(p => p.name == "head_weight").parameter.grad!; // [T, H, O]
        Assert.Equal(new long[] { TestNetworks.Timesteps, 16, 4 }, headGrad.shape);
        var perStep = headGrad.abs().sum(new long[] { 1, 2 });
        for (var step = 0; step < TestNetworks.Timesteps; step++)
            Assert.Equal(step is 2 or 5, perStep[step].item<float>() > 0);
        Assert.All(net.named_parameters().Where(p => p.name.StartsWith("trunk", StringComparison.Ordinal)),
            p => Assert.True(p.parameter.grad!.abs().sum().item<float>() > 0, p.name));
    }
}
