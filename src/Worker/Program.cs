DistDiffusion.Protocol.SocketCompletions.PreferInline();
return DistDiffusion.Worker.WorkerCli.Run(args);
