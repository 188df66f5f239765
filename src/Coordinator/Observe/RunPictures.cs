using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Imaging;
using DistDiffusion.Model.Sampling;
using DistDiffusion.Model.Training;
using static TorchSharp.torch;

namespace DistDiffusion.Coordinator.Observe;

/// <summary>Writes sample pictures and arrays: PNG grids for images, scatter plots over the data for points, .npy arrays.</summary>
internal static class RunPictures
{
    /// <summary>Samples [N, ...] to <paramref name="path"/>: .npy (float32 [N, ...]) or .png (grid or scatter over <paramref name="reference"/>).</summary>
    public static void Write(string path, Tensor samples, Recipe recipe, Tensor? reference, string? title = null)
    {
        var kind = OutputKind(path);
        var dir = Path.GetDirectoryName(Path.GetFullPath(path));
        if (!string.IsNullOrEmpty(dir)) Directory.CreateDirectory(dir);
        switch (kind)
        {
            case ".npy":
                Npy.Write(path, samples);
                break;
            case ".png":
                if (recipe.IsImageData) ImageGrid.Save(samples, path);
                else ScatterPlot.Save(samples, path, reference, title);
                break;
        }
    }

    /// <summary>The output's extension, ".png" or ".npy" (lower case); anything else is refused with the path named.</summary>
    public static string OutputKind(string path) => Path.GetExtension(path).ToLowerInvariant() is var ext and (".png" or ".npy")
        ? ext
        : throw new ArgumentException($"--out {path}: expected a .png or .npy file");

    /// <summary>A trajectory strip next to <paramref name="path"/> (name-trajectory.png).</summary>
    public static string WriteTrajectory(string path, IReadOnlyList<Tensor> frames)
    {
        var strip = Path.Combine(Path.GetDirectoryName(Path.GetFullPath(path)) ?? ".", Path.GetFileNameWithoutExtension(path) + "-trajectory.png");
        TrajectoryStrip.Save(frames, strip);
        return strip;
    }

    /// <summary>Reference points to draw under 2-D samples: a fresh draw of the recipe's data set.</summary>
    public static Tensor? Reference(Recipe recipe, int n) =>
        recipe.IsImageData ? null : Synthetic2D.Generate(recipe.Dataset, n, recipe.Seed + 7919);

    /// <summary>The periodic picture of a training run: 64 images or 1,000 points, DDPM, fixed seed, EMA weights.</summary>
    public static string WriteTrainingSamples(TrainingState state, string runDir, long step)
    {
        using var model = DiffusionModel.FromTrainingState(state);
        var n = state.Recipe.IsImageData ? 64 : 1000;
        using var result = model.Sample(new SamplingRequest(n, SamplingMethod.Ddpm, 0, 0, Seed: 0));
        var path = Path.Combine(runDir, "samples", $"step-{step:D7}.png");
        using var reference = Reference(state.Recipe, n);
        Write(path, result.Samples, state.Recipe, reference, $"{state.Recipe.Name} step {step}");
        return path;
    }
}
