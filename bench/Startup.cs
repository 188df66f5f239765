using System.Runtime.CompilerServices;

namespace DistDiffusion.Bench;

internal static class Startup
{
    // Before libtorch loads (see TorchRuntime), as in the coordinator and the worker.
    [ModuleInitializer]
    internal static void Init() => DistDiffusion.Model.TorchRuntime.EnsureConfigured();
}
