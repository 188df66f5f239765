using DistDiffusion.Model.Networks;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Networks;

public class DropoutTests
{
    public static TheoryData<string> Networks => new() { "mlp", "sohl2015", "unet-annotated", "unet-ho2020" };

    private static (DenoiserNetwork Net, long[] Shape) Build(string name, double dropout) => name switch
    {
        "mlp" => (NetworkFactory.Create(TestNetworks.Mlp(NetworkKind.Mlp, dropout).ToNetworkOptions(), [2]), [2]),
        "sohl2015" => (NetworkFactory.Create(TestNetworks.Mlp(NetworkKind.Sohl2015Mlp, dropout).ToNetworkOptions(), [2]), [2]),
        "unet-annotated" => (NetworkFactory.Create(TestNetworks.UNet(UNetLayout.Annotated, [1, 2], dropout).ToNetworkOptions(), [1, 8, 8]), [1, 8, 8]),
        "unet-ho2020" => (NetworkFactory.Create(TestNetworks.UNet(UNetLayout.Ho2020, [1, 2], dropout, attention: [4]).ToNetworkOptions(), [1, 8, 8]), [1, 8, 8]),
        _ => throw new ArgumentException(name),
    };

    [Theory]
    [MemberData(nameof(Networks))]
    public void BatchOfFourEqualsItsHalvesWithMatchingSeeds(string name)
    {
        using var scope = NewDisposeScope();
        var (net, shape) = Build(name, 0.3);
        using var _ = net;
        net.train();
        var (x, t) = TestNetworks.Inputs(4, shape);

        net.SetSampleSeeds([101, 202, 303, 404]);
        var whole = net.forward(x, t);
        net.SetSampleSeeds([101, 202]);
        var first = net.forward(x[..2], t[..2]);
        net.SetSampleSeeds([303, 404]);
        var second = net.forward(x[2..], t[2..]);

        var diff = whole.sub(cat(new[] { first, second }, 0)).abs().max().item<float>();
        Assert.True(diff <= 1e-5, $"{name}: split batch differs by {diff}");

        // Same sample, different seed: a different mask, a different output.
        net.SetSampleSeeds([999, 202, 303, 404]);
        var reseeded = net.forward(x, t);
        Assert.False(reseeded[0].allclose(whole[0], rtol: 0, atol: 1e-6), $"{name}: seed did not change the dropout mask");
        Assert.True(reseeded[1..].allclose(whole[1..], rtol: 0, atol: 1e-5), $"{name}: another sample's seed changed this sample");
    }

    [Theory]
    [MemberData(nameof(Networks))]
    public void EvalModeIsDeterministicAndNeedsNoSeeds(string name)
    {
        using var scope = NewDisposeScope();
        var (net, shape) = Build(name, 0.3);
        using var _ = net;
        net.eval();
        var (x, t) = TestNetworks.Inputs(3, shape);
        var a = net.forward(x, t);
        var b = net.forward(x, t);
        Assert.True(a.eq(b).all().item<bool>());
    }

    [Fact]
    public void TrainingWithDropoutAndNoSeedsThrows()
    {
        using var scope = NewDisposeScope();
        var (net, shape) = Build("mlp", 0.3);
        using var _ = net;
        net.train();
        var (x, t) = TestNetworks.Inputs(3, shape);
        Assert.Throws<InvalidOperationException>(() => net.forward(x, t));
        net.SetSampleSeeds([1, 2]);
        Assert.Throws<InvalidOperationException>(() => net.forward(x, t));
    }

    [Fact]
    public void SampleDropoutKeepsAboutOneMinusPAndRescales()
    {
        using var scope = NewDisposeScope();
        var (net, _) = Build("mlp", 0.25);
        using var __ = net;
        net.train();
        var dropout = net.modules().OfType<SampleDropout>().First();
        net.SetSampleSeeds([7, 8]);
        var y = dropout.forward(ones(2, 4000));
        var kept = y.ne(0).to(ScalarType.Float32).mean().item<float>();
        Assert.InRange(kept, 0.72, 0.78);
        Assert.Equal(1 / 0.75, y.max().item<float>(), 4);
        Assert.Equal(new long[] { 0, 1, 2 }, net.modules().OfType<SampleDropout>().Select(d => d.LayerIndex).ToArray());
    }
}
