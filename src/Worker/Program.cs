return DistDiffusion.Worker.WorkerCli.Run(args);
