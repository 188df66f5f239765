namespace DistDiffusion.Tests;
public class SmokeTests { [Fact] public void TorchLoads() => Assert.Equal(2f, TorchSharp.torch.ones(2).sum().item<float>()); }
