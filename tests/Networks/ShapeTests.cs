using DistDiffusion.Model.Networks;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Networks;

public class ShapeTests
{
    [Theory]
    [InlineData(NetworkKind.Mlp, false, 2)]
    [InlineData(NetworkKind.Mlp, true, 4)]
    [InlineData(NetworkKind.Sohl2015Mlp, false, 2)]
    [InlineData(NetworkKind.Sohl2015Mlp, true, 4)]
    public void MlpOutputsPointsOrPointsAndVariance(NetworkKind kind, bool learnedVariance, long outputs)
    {
        using var scope = NewDisposeScope();
        using var net = NetworkFactory.Create(TestNetworks.Mlp(kind, learnedVariance: learnedVariance).ToNetworkOptions(), [2]);
        var (x, t) = TestNetworks.Inputs(5, [2]);
        var y = net.forward(x, t);
        Assert.Equal(new long[] { 5, outputs }, y.shape);
        Assert.Equal(learnedVariance, net.LearnedVariance);
        Assert.Equal(new long[] { 2 }, net.DataShape);
    }

    [Theory]
    [InlineData(UNetLayout.Annotated, "1,2,2", 1, 28, false)]
    [InlineData(UNetLayout.Annotated, "1,2,4", 1, 28, false)]
    [InlineData(UNetLayout.Annotated, "1,2,2", 1, 28, true)]
    [InlineData(UNetLayout.Annotated, "1,2,2,2", 3, 32, false)]
    [InlineData(UNetLayout.Annotated, "1,2,2,2", 3, 32, true)]
    [InlineData(UNetLayout.Ho2020, "1,2,2", 1, 28, false)]
    [InlineData(UNetLayout.Ho2020, "1,2,4", 1, 28, false)]
    [InlineData(UNetLayout.Ho2020, "1,2,2", 1, 28, true)]
    [InlineData(UNetLayout.Ho2020, "1,2,2,2", 3, 32, false)]
    [InlineData(UNetLayout.Ho2020, "1,2,2,2", 3, 32, true)]
    public void UNetKeepsImageShapeAndDoublesChannelsForLearnedVariance(UNetLayout layout, string multipliers, long channels, long side, bool learnedVariance)
    {
        using var scope = NewDisposeScope();
        var mults = multipliers.Split(',').Select(int.Parse).ToArray();
        using var net = NetworkFactory.Create(TestNetworks.UNet(layout, mults, learnedVariance: learnedVariance, resBlocks: 2).ToNetworkOptions(), [channels, side, side]);
        var (x, t) = TestNetworks.Inputs(2, [channels, side, side]);
        var y = net.forward(x, t);
        Assert.Equal(new[] { 2, learnedVariance ? 2 * channels : channels, side, side }, y.shape);
        Assert.True(y.isfinite().all().item<bool>(), "non-finite output");
    }

    [Theory]
    [InlineData(UNetLayout.Annotated)]
    [InlineData(UNetLayout.Ho2020)]
    public void GroupNormsStartAsIdentityAffine(UNetLayout layout)
    {
        // Guards against TorchSharp's uninitialized GroupNorm parameters (see Norm.GroupNorm).
        using var net = NetworkFactory.Create(TestNetworks.UNet(layout, [1, 2]).ToNetworkOptions(), [1, 8, 8]);
        var norms = net.modules().OfType<TorchSharp.Modules.GroupNorm>().ToArray();
        Assert.NotEmpty(norms);
        Assert.All(norms, n =>
        {
            Assert.True(n.weight!.eq(1).all().item<bool>());
            Assert.True(n.bias!.eq(0).all().item<bool>());
        });
    }

    [Fact]
    public void ImageSideNotDivisibleByStagesIsRejectedNamingTheField()
    {
        // 28 -> 14 -> 7 -> 3.5: four stages need a side divisible by 8.
        var e = Assert.Throws<ArgumentException>(() => NetworkFactory.Create(TestNetworks.UNet(UNetLayout.Annotated, [1, 2, 2, 2]).ToNetworkOptions(), [1, 28, 28]));
        Assert.Contains("channel-multipliers", e.Message, StringComparison.Ordinal);
        Assert.Contains("28", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void GroupsNotDividingChannelsAreRejectedNamingTheField()
    {
        var recipe = TestNetworks.UNet(UNetLayout.Ho2020, [1, 2]) with { GroupNormGroups = 3 };
        var e = Assert.Throws<ArgumentException>(() => NetworkFactory.Create(recipe.ToNetworkOptions(), [1, 8, 8]));
        Assert.Contains("group-norm-groups", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void DataShapeMustMatchTheNetworkKind()
    {
        Assert.Throws<ArgumentException>(() => NetworkFactory.Create(TestNetworks.Mlp().ToNetworkOptions(), [1, 28, 28]));
        Assert.Throws<ArgumentException>(() => NetworkFactory.Create(TestNetworks.UNet(UNetLayout.Annotated, [1, 2]).ToNetworkOptions(), [2]));
    }

    [Fact]
    public void ForwardRejectsInputOfTheWrongShape()
    {
        using var scope = NewDisposeScope();
        using var net = NetworkFactory.Create(TestNetworks.Mlp().ToNetworkOptions(), [2]);
        var (x, t) = TestNetworks.Inputs(3, [3]);
        Assert.Throws<ArgumentException>(() => net.forward(x, t));
    }

    [Fact]
    public void Ho2020Cifar10NetworkHasThePapersParameterCount()
    {
        var recipe = TestNetworks.UNet(UNetLayout.Ho2020, [1, 2, 2, 2], attention: [16], resBlocks: 2) with { BaseChannels = 128, GroupNormGroups = 32 };
        using var net = NetworkFactory.Create(recipe.ToNetworkOptions(), [3, 32, 32]);
        var count = net.parameters().Sum(p => p.numel());
        // pytorch_diffusion's Model(ch=128, ch_mult=(1,2,2,2), num_res_blocks=2, attn_resolutions=(16,)) has 35,746,307.
        Assert.InRange(count, 35_746_307 * 0.999, 35_746_307 * 1.001);
        Assert.Equal(35_746_307, count);
    }
}
