// Before anything can start .NET's signal handling: an inherited "ignore SIGINT" would make it deaf to kill -INT.
DistDiffusion.Coordinator.Cli.StopSignals.StopIgnoringInterrupt();
DistDiffusion.Protocol.SocketCompletions.PreferInline();
DistDiffusion.Protocol.StepTimeline.Start("coordinator");
return DistDiffusion.Coordinator.Cli.CoordinatorCli.Run(args);
