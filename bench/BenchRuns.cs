using System.Globalization;
using DistDiffusion.Protocol;

namespace DistDiffusion.Bench;

/// <summary>The `coordinator run` a benchmark starts as a child process.</summary>
internal static class BenchRuns
{
    /// <summary>
    /// Its arguments: no checkpoints or sample pictures along the way (they would be measured too), then the caller's
    /// recipe overrides.
    /// </summary>
    internal static string[] RunArguments(string recipe, int workers, long steps, string outDir, bool sharedMemory, TrainerTransport transport, string logLevel, IEnumerable<string> sets) =>
    [
        "run", "--workers", workers.ToString(CultureInfo.InvariantCulture), "--recipe", recipe, "--steps", steps.ToString(CultureInfo.InvariantCulture),
        "--out", outDir, "--shared-memory", sharedMemory ? "true" : "false", "--worker-transport", TrainerTransports.Name(transport), "--log-level", logLevel,
        "--set", "checkpoint-every=0", "--set", "sample-every=0", .. sets.SelectMany(s => new[] { "--set", s }),
    ];
}
