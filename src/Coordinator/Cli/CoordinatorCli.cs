using System.CommandLine;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>The `coordinator` command line: its verbs and their exit codes (0 ok, 1 failure, 2 usage).</summary>
public static class CoordinatorCli
{
    public static RootCommand Build() => new("DistDiffusion coordinator: train, sample and evaluate diffusion models (DDPM)")
    {
        TrainCommand.Create(),
        SampleCommand.Create(),
        EvalCommand.Create(),
        ClassifierCommand.Create(),
        DownloadCommand.Create(),
        ServeCommand.Create(),
        RunCommand.Create(),
        StatusCommand.Create(),
        RecipesCommand.Create(),
    };

    public static int Run(string[] args) => CliSupport.Invoke(Build(), args);
}
