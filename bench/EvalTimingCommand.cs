using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using DistDiffusion.Coordinator.Access;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Hosting;
using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;
using DistDiffusion.Model.Data;
using DistDiffusion.Model.Diffusion;
using DistDiffusion.Model.Metrics;
using DistDiffusion.Model.Training;
using DistDiffusion.Protocol;

namespace DistDiffusion.Bench;

/// <summary>
/// `bench eval`: wall time of `eval` in this process vs `eval --address` on a coordinator with N worker
/// processes (same weights, thread count and bits/dim batch), and whether the bits/dim figure is the same.
/// </summary>
internal static class EvalTimingCommand
{
    public static Command Create()
    {
        var checkpoint = new Option<string?>("--checkpoint") { Description = "A run folder or checkpoint of an image recipe (default: an untrained mnist-small, data/mnist)" };
        var images = new Option<int>("--bpd-images") { Description = "Held-out images for bits/dim (and as many samples, at most 64)", DefaultValueFactory = _ => 16 };
        var batch = new Option<int>("--bpd-batch") { Description = "Held-out images per bits/dim batch (the unit of work of a worker)", DefaultValueFactory = _ => 8 };
        var workers = new Option<int>("--workers") { Description = "Worker processes of the distributed run", DefaultValueFactory = _ => 2 };
        var threads = new Option<int>("--threads") { Description = "Intra-op threads of this process and of each worker", DefaultValueFactory = _ => 1 };
        var cmd = new Command("eval", "Wall time of eval in one process vs over a coordinator's workers") { checkpoint, images, batch, workers, threads };
        cmd.SetAction(p =>
        {
            var m = p.GetValue(images);
            var b = p.GetValue(batch);
            var n = p.GetValue(workers);
            var t = p.GetValue(threads);
            if (m < 1) throw new UsageException($"--bpd-images {m}: expected at least 1");
            EvalCommand.CheckBpdBatch(b);
            if (n < 1) throw new UsageException($"--workers {n}: expected at least 1");
            if (t < 1) throw new UsageException($"--threads {t}: expected at least 1");
            var temp = Path.Combine(Path.GetTempPath(), "dd-benchmark-eval-" + Guid.NewGuid().ToString("N"));
            try
            {
                return Run(p.GetValue(checkpoint) ?? UntrainedMnistSmall(temp), m, b, n, t);
            }
            finally
            {
                if (Directory.Exists(temp)) Directory.Delete(temp, true);
            }
        });
        return cmd;
    }

    private static string UntrainedMnistSmall(string dir)
    {
        var recipe = Recipes.MnistSmall.WithResolvedDataPath();
        using var state = TrainingState.Create(recipe, recipe.SampleShape, 1, Model.TorchRuntime.ResolveDevice("cpu", 1));
        CheckpointStore.Save(dir, state.ToCheckpoint());
        return dir;
    }

    private static int Run(string checkpoint, int m, int batch, int workers, int threads)
    {
        var inv = CultureInfo.InvariantCulture;
        var device = CliSupport.ResolveDevice("cpu", threads);
        var clock = Stopwatch.StartNew();
        EvalReport local;
        var (model, data) = CliSupport.LoadModel(checkpoint, false, device, r => r.WithResolvedDataPath());
        using (model)
        {
            if (!model.Recipe.IsImageData) throw new UsageException($"--checkpoint {checkpoint}: recipe {model.Recipe.Name} has 2-D data; bench eval times bits/dim of an image recipe");
            var (train, heldOut) = DatasetLoader.Load(model.Recipe.ToDataOptions());
            using (train)
            using (heldOut)
                local = Evaluator.Evaluate(new LocalEvalSource(model) { BpdBatch = batch }, model.Recipe, data.Step, train, heldOut, 2000, m, EvalCommand.Seed);
        }
        var localSeconds = clock.Elapsed.TotalSeconds;

        Model.TorchRuntime.PreferPassiveThreads();
        var credentials = new ServerCredentials(null, Worker: Token.Generate(), Client: Token.Generate());
        var options = new CoordinatorOptions { Listen = "http://127.0.0.1:0", Checkpoint = checkpoint, SampleOnly = true, Threads = threads };
        var processes = new List<Process>();
        double remoteSeconds;
        EvalReport remote;
        int used;
#pragma warning disable CA2000 // disposed in the finally below (DisposeAsync, which the analyzer does not follow through GetResult)
        var server = CoordinatorServer.StartAsync(options, credentials, Serilog.Events.LogEventLevel.Warning, "[coordinator] ").GetAwaiter().GetResult();
#pragma warning restore CA2000
        try
        {
            for (var i = 0; i < workers; i++)
                processes.Add(RunCommand.StartWorker(server.Address, credentials.Worker!, threads, "warning", $"[worker {i + 1}] ", Console.Error.WriteLine));
            var wait = Stopwatch.StartNew();
            while (server.Sampling.WorkerCount < workers)
            {
                if (wait.Elapsed > TimeSpan.FromSeconds(120)) throw new TimeoutException($"{workers} workers did not connect within 120 s");
                Thread.Sleep(50);
            }
            using var channel = ClientChannel.Create(server.Address);
            clock.Restart();
            var (report, fetched) = RemoteEval.Evaluate(channel, credentials.Client, 3600, 2000, m, batch, false, SamplingMethod.Ddpm, 0, 0, EvalCommand.Seed, showProgress: false, CancellationToken.None);
            remoteSeconds = clock.Elapsed.TotalSeconds;
            remote = report;
            used = fetched.Workers;
            fetched.Dispose();
        }
        finally
        {
            server.DisposeAsync().AsTask().GetAwaiter().GetResult();
            // Workers of a coordinator that stops keep trying to reconnect: end the ones started here.
            foreach (var p in processes)
            {
                if (!p.HasExited) p.Kill(entireProcessTree: true);
                p.WaitForExit(TimeSpan.FromSeconds(10));
                p.Dispose();
            }
        }
        Console.WriteLine(string.Create(inv, $"bench eval: {local.Recipe} step {local.Step}, {m} held-out images (bits/dim batch {batch}) and {local.SampleCount} samples, {threads} thread(s) each"));
        Console.WriteLine(string.Create(inv, $"one process        {localSeconds,8:F1} s"));
        Console.WriteLine(string.Create(inv, $"{used} workers          {remoteSeconds,8:F1} s  ({localSeconds / remoteSeconds:F2}x)"));
        Console.WriteLine(string.Create(inv, $"bits/dim {local.BitsPerDim:F4} one process, {remote.BitsPerDim:F4} workers: {(local.BitsPerDim == remote.BitsPerDim ? "identical" : "DIFFERENT")}"));
        return local.BitsPerDim == remote.BitsPerDim ? CliSupport.ExitOk : CliSupport.ExitFailure;
    }
}
