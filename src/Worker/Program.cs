DistDiffusion.Protocol.SocketCompletions.PreferInline();
DistDiffusion.Protocol.StepTimeline.Start("worker");
return DistDiffusion.Worker.WorkerCli.Run(args);
