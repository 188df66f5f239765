using System.CommandLine;
using DistDiffusion.Coordinator.Cli;

var root = new RootCommand("DistDiffusion coordinator: train, sample and evaluate diffusion models (DDPM)")
{
    TrainCommand.Create(),
    SampleCommand.Create(),
    EvalCommand.Create(),
};
return CliSupport.Invoke(root, args);
