return DistDiffusion.Coordinator.Cli.CoordinatorCli.Run(args);
