using System.Runtime.CompilerServices;

namespace DistDiffusion.Tests;

internal static class TestRuntime
{
    /// <summary>Native settings first, before any test touches TorchSharp.</summary>
    [ModuleInitializer]
    internal static void Init() => DistDiffusion.Model.TorchRuntime.EnsureConfigured();
}
