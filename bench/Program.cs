// As the coordinator's Main: exchange, straggler and eval run a coordinator in this process.
DistDiffusion.Protocol.SocketCompletions.PreferInline();
DistDiffusion.Protocol.StepTimeline.Start("coordinator");
return DistDiffusion.Bench.BenchCli.Run(args);
