namespace DistDiffusion.Model.Networks;

/// <summary>Builds the denoiser the options ask for, after <see cref="NetworkOptions.Validate"/> checked that they can work for the data shape.</summary>
public static class NetworkFactory
{
    /// <param name="options">the network fields of a recipe (<c>Recipe.ToNetworkOptions()</c>).</param>
    /// <param name="dataShape">per-sample shape: [D] for points (D = 2 for the 2-D sets), [C, H, W] for images.</param>
    /// <exception cref="ArgumentException">an impossible configuration, naming the field, the value and what was expected.</exception>
    public static DenoiserNetwork Create(NetworkOptions options, long[] dataShape)
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Validate(dataShape);
        if (options.Network is not (NetworkKind.Mlp or NetworkKind.Sohl2015Mlp)) ConvolutionCheck.Ensure();   // once per process, before the first convolution
        lock (Randomness.GlobalGeneratorLock)   // initial weights come from torch's global generator
            return options.Network switch
            {
                NetworkKind.Mlp => new Mlp(options.Mlp, options.Dropout, dataShape, options.LearnedVariance),
                NetworkKind.Sohl2015Mlp => new Sohl2015Mlp(options.Mlp, options.Dropout, dataShape, options.LearnedVariance),
                _ => new UNet(options.UNet, options.Dropout, dataShape, options.LearnedVariance, options.Classes),
            };
    }
}
