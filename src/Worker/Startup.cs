using System.Runtime.CompilerServices;

namespace DistDiffusion.Worker;

internal static class Startup
{
    // Caps oneDNN's ISA before libtorch loads (see TorchRuntime): the conv-gradient bug applies to workers too.
    [ModuleInitializer]
    internal static void Init() => DistDiffusion.Model.TorchRuntime.EnsureConfigured();
}
