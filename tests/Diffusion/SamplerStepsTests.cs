using DistDiffusion.Model.Diffusion;

namespace DistDiffusion.Tests.Diffusion;

public class SamplerStepsTests
{
    [Theory]
    [InlineData(SamplingMethod.Ddpm, 0, 50)]
    [InlineData(SamplingMethod.Ddpm, 50, 50)]
    [InlineData(SamplingMethod.Ddim, 0, 50)]
    [InlineData(SamplingMethod.Ddim, 1, 1)]
    [InlineData(SamplingMethod.Ddim, 10, 10)]
    [InlineData(SamplingMethod.Ddim, 50, 50)]
    public void CountsTheStepsEachSamplerVisits(SamplingMethod kind, long requested, int expected)
    {
        Assert.Null(SamplerSteps.Problem(kind, requested, 50));
        Assert.Equal(expected, SamplerSteps.Count(kind, requested, 50));
    }

    [Theory]
    [InlineData(SamplingMethod.Ddpm, 10, "DDPM")]
    [InlineData(SamplingMethod.Ddpm, 51, "DDPM")]
    [InlineData(SamplingMethod.Ddim, 51, "1..50")]
    [InlineData(SamplingMethod.Ddim, -1, "1..50")]
    [InlineData((SamplingMethod)7, 0, "ddpm or ddim")]
    public void RefusesCountsASamplerDoesNotTake(SamplingMethod kind, long requested, string because)
    {
        Assert.Contains(because, SamplerSteps.Problem(kind, requested, 50));
        Assert.Contains(because, Assert.Throws<ArgumentException>(() => SamplerSteps.Count(kind, requested, 50)).Message);
    }
}
