using DistDiffusion.Model.Diffusion;

namespace DistDiffusion.Tests.Diffusion;

public class SamplerStepsTests
{
    [Theory]
    [InlineData(SamplerKind.Ddpm, 0, 50)]
    [InlineData(SamplerKind.Ddpm, 50, 50)]
    [InlineData(SamplerKind.Ddim, 0, 50)]
    [InlineData(SamplerKind.Ddim, 1, 1)]
    [InlineData(SamplerKind.Ddim, 10, 10)]
    [InlineData(SamplerKind.Ddim, 50, 50)]
    public void CountsTheStepsEachSamplerVisits(SamplerKind kind, long requested, int expected)
    {
        Assert.Null(SamplerSteps.Problem(kind, requested, 50));
        Assert.Equal(expected, SamplerSteps.Count(kind, requested, 50));
    }

    [Theory]
    [InlineData(SamplerKind.Ddpm, 10, "DDPM")]
    [InlineData(SamplerKind.Ddpm, 51, "DDPM")]
    [InlineData(SamplerKind.Ddim, 51, "1..50")]
    [InlineData(SamplerKind.Ddim, -1, "1..50")]
    [InlineData((SamplerKind)7, 0, "ddpm or ddim")]
    public void RefusesCountsASamplerDoesNotTake(SamplerKind kind, long requested, string because)
    {
        Assert.Contains(because, SamplerSteps.Problem(kind, requested, 50));
        Assert.Contains(because, Assert.Throws<ArgumentException>(() => SamplerSteps.Count(kind, requested, 50)).Message);
    }
}
