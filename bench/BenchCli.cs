using System.CommandLine;
using DistDiffusion.Coordinator.Cli;

namespace DistDiffusion.Bench;

/// <summary>The `bench` command line: the benchmarks and their exit codes (0 ok or goal reported, 1 failure, 2 usage).</summary>
public static class BenchCli
{
    public static RootCommand Build() => new("DistDiffusion benchmarks: the exchange, memory, step timeline, straggler, fault and distributed-eval figures of the README")
    {
        ExchangeCommand.Create(),
        SoakCommand.Create(),
        TimelineCommand.Create(),
        StragglerCommand.Create(),
        ChaosCommand.Create(),
        EvalTimingCommand.Create(),
    };

    public static int Run(string[] args) => CliSupport.Invoke(Build(), args);
}
