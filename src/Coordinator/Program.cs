// Before anything can start .NET's signal handling: an inherited "ignore SIGINT" would make it deaf to kill -INT.
DistDiffusion.Coordinator.Cli.StopSignals.StopIgnoringInterrupt();
DistDiffusion.Protocol.SocketCompletions.PreferInline();
return DistDiffusion.Coordinator.Cli.CoordinatorCli.Run(args);
