using System.Runtime.CompilerServices;

namespace DistDiffusion.Coordinator;

internal static class Startup
{
    [ModuleInitializer]
    internal static void Init() => DistDiffusion.Model.TorchRuntime.EnsureConfigured();
}
