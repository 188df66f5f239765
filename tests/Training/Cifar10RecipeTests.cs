using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Imaging;
using DistDiffusion.Model.Networks;
using DistDiffusion.Model.Training;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Training;

public class Cifar10RecipeTests
{
    /// <summary>The paper's CIFAR-10 configuration runs a real optimizer step (batch 2 here; 128 on a GPU cluster).</summary>
    [Fact]
    public void OneStepOfTheCifar10RecipeRuns()
    {
        var folder = Path.Combine(Path.GetTempPath(), "dd-cifar-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(folder);
        try
        {
            for (var i = 0; i < 4; i++)
            {
                using var img = CounterRng.NormalRows([(ulong)i], [3, 32, 32], CPU).clamp(-1, 1);
                ImageGrid.Save(img, Path.Combine(folder, $"img-{i}.png"));
            }
            var recipe = Recipes.Cifar10Ddpm with { DataPath = folder, BatchSize = 2, HeldOutFraction = 0.25 };
            var (train, heldOut) = DatasetLoader.Load(recipe.ToDataOptions());
            using (train)
            using (heldOut)
            {
                Assert.Equal(new long[] { 3, 32, 32 }, train.SampleShape);
                using var state = TrainingState.Create(recipe, train.SampleShape, train.Count, CPU);
                Assert.Equal(35_746_307, state.Network.parameters().Sum(p => p.numel()));
                Assert.IsType<UNet>(state.Network);
                var before = state.Network.parameters().First().clone();
                using var trainer = new LocalTrainer(state, train, Path.Combine(folder, "run"));
                var (loss, norm) = trainer.TrainStep();
                Assert.True(double.IsFinite(loss) && loss > 0, $"loss {loss}");
                Assert.True(double.IsFinite(norm) && norm > 0, $"gradient norm {norm}");
                Assert.Equal(1, state.StepsDone);
                Assert.False(state.Network.parameters().First().eq(before).all().item<bool>(), "the first weight did not move");
            }
        }
        finally
        {
            Directory.Delete(folder, true);
        }
    }
}
