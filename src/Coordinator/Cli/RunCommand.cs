using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using DistDiffusion.Coordinator.Access;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Hosting;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>
/// `coordinator run --workers N`: a coordinator in this process and N worker processes on this machine (like
/// torchrun), over real gRPC on loopback with two fresh random tokens: the workers' (in their environment) and the
/// clients' (written to OUT/token, owner-only, for `status` and `sample`). Prefixes
/// each process's log lines, shows a progress bar, and stops everything on Ctrl+C, SIGINT or SIGTERM or when a worker
/// fails. The workers are started with --exit-with-parent, so they exit by themselves should this process die.
/// </summary>
internal static class RunCommand
{
    public static Command Create()
    {
        var workers = new Option<int>("--workers") { Description = "Worker processes to start", DefaultValueFactory = _ => 2 };
        var recipe = new Option<string?>("--recipe") { Description = CliSupport.RecipeDescription };
        var set = new Option<string[]>("--set") { Description = "Override a recipe field, key=value (repeatable)" };
        var steps = new Option<int?>("--steps") { Description = "Train until this many steps are done" };
        var seed = new Option<long?>("--seed") { Description = "Run seed" };
        var output = new Option<string?>("--out") { Description = "Run folder" };
        var resume = new Option<string?>("--resume") { Description = "Continue the run in this folder from its latest checkpoint" };
        var workerThreads = new Option<int>("--worker-threads") { Description = "CPU threads per worker (0: the machine's cores divided among the workers)", DefaultValueFactory = _ => 0 };
        var workerTransport = new Option<string>("--worker-transport") { Description = "How the workers' Trainer streams travel: socket (default) or grpc", DefaultValueFactory = _ => "socket" };
        var gradientDtype = new Option<string>("--gradient-dtype") { Description = "float32 (exact) or bfloat16", DefaultValueFactory = _ => "float32" };
        var keepCheckpoints = CliSupport.KeepCheckpointsOption();
        var keepEvery = CliSupport.KeepEveryOption();
        var logLevel = new Option<string>("--log-level") { Description = "Log level of the coordinator and workers (debug, information, warning, error)", DefaultValueFactory = _ => "warning" };
        var logEvery = CliSupport.LogEveryOption();
        var logFormat = new Option<string>("--log-format") { Description = "Log format of the coordinator and workers: text (lines prefixed [coordinator], [worker N]) or json (Serilog's compact JSON, one event per line, unprefixed)", DefaultValueFactory = _ => "text" };
        var pinWorkers = new Option<string>("--pin-workers")
        {
            Description = "auto (default): each worker's threads on CPUs of its own when the workers' threads fill the CPUs this process may use exactly (as with --worker-threads 0); otherwise, and with none, wherever the kernel puts them",
            DefaultValueFactory = _ => "auto",
        };
        var devices = new Option<string?>("--devices") { Description = "Devices for the workers, round robin: GPU indices and/or cpu, e.g. 0,1 (default: every visible GPU, else the CPU)" };
        var cmd = new Command("run", "Train with a coordinator and N worker processes on this machine")
        {
            logEvery, logFormat, devices, pinWorkers, workers, recipe, set, steps, seed, output, resume, workerThreads, workerTransport, gradientDtype, ServeCommand.SharedMemory, keepCheckpoints, keepEvery, logLevel,
        };
        cmd.SetAction(p =>
        {
            var n = p.GetValue(workers);
            if (n < 1) throw new UsageException($"--workers {n}: expected at least 1");
            var threads = p.GetValue(workerThreads);
            if (threads < 0) throw new UsageException($"--worker-threads {threads}: expected 0 (divide the cores) or a positive count");
            var transport = CliSupport.UserInput(() => TrainerTransports.Parse(p.GetValue(workerTransport)!, "--worker-transport"));
            var pin = p.GetValue(pinWorkers)!.Trim().ToLowerInvariant() switch
            {
                "auto" => true,
                "none" => false,
                var other => throw new UsageException($"--pin-workers {other}: expected auto or none"),
            };
            if (p.GetValue(resume) is null && p.GetValue(output) is null) throw new UsageException("--out DIR is required (or --resume DIR)");
            if (p.GetValue(resume) is null && p.GetValue(recipe) is null) throw new UsageException("--recipe is required (or --resume DIR)");
            var options = new CoordinatorOptions
            {
                // The client verbs' default address when it is free (else any free port); endpoints.json says which.
                Listen = RunEndpoints.IsFree(RunEndpoints.PreferredGrpcPort) ? $"http://127.0.0.1:{RunEndpoints.PreferredGrpcPort}" : "http://127.0.0.1:0",
                Recipe = p.GetValue(recipe),
                Set = p.GetValue(set) ?? [],
                Steps = p.GetValue(steps),
                Seed = p.GetValue(seed),
                Out = p.GetValue(output),
                Resume = p.GetValue(resume),
                GradientDtype = p.GetValue(gradientDtype)!,
                SharedMemory = p.GetValue(ServeCommand.SharedMemory) ?? true,
                KeepCheckpoints = p.GetValue(keepCheckpoints) ?? Model.Checkpoints.CheckpointRetention.DefaultKeepLast,
                KeepEvery = p.GetValue(keepEvery),
                MinWorkers = n,
                // /metrics and the dashboard on a free port; endpoints.json says which.
                Http = "http://127.0.0.1:0",
                LogEvery = p.GetValue(logEvery),
                LogFormat = p.GetValue(logFormat)!,
                // The coordinator's own torch work (Adam, EMA) is small; its cores belong to the workers.
                Threads = 1,
            };
            var deviceList = CliSupport.UserInput(() => WorkerDevices(p.GetValue(devices), TorchSharp.torch.cuda.is_available() ? TorchSharp.torch.cuda.device_count() : 0));
            // All processes share this machine: OpenMP threads must not spin on cores another process computes on.
            Model.TorchRuntime.PreferPassiveThreads();
            var level = p.GetValue(logLevel)!;
            CliSupport.UserInput(() => CliSupport.ParseLogLevel(level));
            // Two fresh tokens: the workers' (in their environment only) and the clients' (OUT/token, for status and sample),
            // so the token file on disk lets nobody join the run and push gradients.
            var credentials = new ServerCredentials(null, Worker: Token.Generate(), Client: Token.Generate());
            // Bad settings surface while starting (usage errors, exit 2); later failures are failures (exit 1).
            CoordinatorServer Start() => CliSupport.UserInput(() => CoordinatorServer.StartAsync(options, credentials, CliSupport.ParseLogLevel(level), options.LogFormat == "json" ? "" : "[coordinator] ").GetAwaiter().GetResult());
            CoordinatorServer server;
            try
            {
                server = Start();
            }
            catch (IOException e) when (RunEndpoints.IsAddressInUse(e) && options.Listen != "http://127.0.0.1:0")
            {
                // Another process took 50051 between the check and the bind: any free port will do.
                options.Listen = "http://127.0.0.1:0";
                server = Start();
            }
            var perWorker = threads > 0 ? threads : Math.Max(1, Environment.ProcessorCount / n);
            var cpus = pin ? Worker.CpuAffinity.Blocks(Worker.CpuAffinity.Allowed(), n, perWorker) : null;
            return RunAsync(server, credentials, n, perWorker, level, options.LogFormat, deviceList, transport, cpus).GetAwaiter().GetResult();
        });
        return cmd;
    }

    /// <summary>
    /// Starts a worker process for <paramref name="address"/> with the worker token in its environment (nowhere on disk),
    /// the allocator settings, and --exit-with-parent: should this process die without its finally block (SIGKILL, a
    /// crash), the worker notices within a second and exits instead of retrying the coordinator until --give-up-after
    /// runs out. Its output lines go to <paramref name="output"/> with <paramref name="prefix"/>.
    /// </summary>
    internal static Process StartWorker(Uri address, string workerToken, int threads, string logLevel, string prefix, Action<string> output, double giveUpAfterSeconds = 60,
        string device = "cpu", string logFormat = "text", TrainerTransport transport = TrainerTransport.Socket, IReadOnlyList<int>? cpus = null)
    {
        var psi = WorkerStartInfo(["--coordinator", address.ToString(), "--threads", threads.ToString(CultureInfo.InvariantCulture), "--log-level", logLevel,
            "--log-format", logFormat, "--device", device, "--transport", TrainerTransports.Name(transport), "--give-up-after", giveUpAfterSeconds.ToString(CultureInfo.InvariantCulture), "--exit-with-parent", Environment.ProcessId.ToString(CultureInfo.InvariantCulture),
            .. cpus is null ? Array.Empty<string>() : ["--cpu-affinity", Worker.CpuAffinity.Format(cpus)]]);
        psi.Environment.Remove(Names.TokenEnvironmentVariable);
        psi.Environment.Remove(Names.ClientTokenEnvironmentVariable);
        psi.Environment[Names.WorkerTokenEnvironmentVariable] = workerToken;
        foreach (var (key, value) in Model.TorchRuntime.AllocatorEnvironment()) psi.Environment[key] = value;
        return StartForwarding(psi, prefix, output);
    }

    /// <summary>Starts <paramref name="psi"/> (output redirected) with every line of its output and error streams passed to <paramref name="output"/> after <paramref name="prefix"/>.</summary>
    internal static Process StartForwarding(ProcessStartInfo psi, string prefix, Action<string> output)
    {
        var process = Process.Start(psi) ?? throw new InvalidOperationException($"could not start {psi.FileName}");
        process.OutputDataReceived += (_, e) => { if (e.Data is not null) output(prefix + e.Data); };
        process.ErrorDataReceived += (_, e) => { if (e.Data is not null) output(prefix + e.Data); };
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        return process;
    }

    /// <summary>
    /// The --device of each worker, given round robin: `--devices 0,1` is cuda:0, cuda:1, cuda:0, ...; "cpu" entries stay on
    /// the CPU. Without --devices: every visible GPU in turn, else the CPU.
    /// </summary>
    internal static string[] WorkerDevices(string? list, int gpus)
    {
        if (list is null) return gpus > 0 ? [.. Enumerable.Range(0, gpus).Select(i => $"cuda:{i}")] : ["cpu"];
        var entries = list.Split(',', StringSplitOptions.TrimEntries);
        if (entries.Length == 0 || entries.Any(e => e.Length == 0)) throw new ArgumentException($"--devices {list}: expected GPU indices or cpu, separated by commas (e.g. 0,1)");
        return [.. entries.Select(e =>
        {
            if (e.Equals("cpu", StringComparison.OrdinalIgnoreCase)) return "cpu";
            if (!int.TryParse(e, NumberStyles.None, CultureInfo.InvariantCulture, out var i)) throw new ArgumentException($"--devices {list}: '{e}' is neither a GPU index nor cpu");
            if (i >= gpus) throw new ArgumentException(gpus == 0 ? $"--devices {list}: GPU {i} asked for, but CUDA is not available here (use cpu)" : $"--devices {list}: GPU {i} asked for, but {gpus} are visible (0..{gpus - 1})");
            return $"cuda:{i}";
        })];
    }

    /// <summary>The worker executable shipped beside this one.</summary>
    internal static ProcessStartInfo WorkerStartInfo(IEnumerable<string> args) => StartInfo("worker", args);

    /// <summary>One of the executables in this folder (its apphost, else `dotnet NAME.dll`), output redirected.</summary>
    internal static ProcessStartInfo StartInfo(string executable, IEnumerable<string> args)
    {
        var dir = AppContext.BaseDirectory;
        var host = Path.Combine(dir, OperatingSystem.IsWindows() ? executable + ".exe" : executable);
        var psi = File.Exists(host) ? new ProcessStartInfo(host) : new ProcessStartInfo("dotnet") { ArgumentList = { Path.Combine(dir, executable + ".dll") } };
        foreach (var a in args) psi.ArgumentList.Add(a);
        psi.UseShellExecute = false;
        psi.RedirectStandardOutput = true;
        psi.RedirectStandardError = true;
        return psi;
    }

    private static async Task<int> RunAsync(CoordinatorServer started, ServerCredentials credentials, int workerCount, int threads, string logLevel, string logFormat, string[] devices, TrainerTransport transport,
        IReadOnlyList<int>[]? cpus)
    {
        using var cts = new CancellationTokenSource();
        using var signals = StopSignals.Register(cts);
        var processes = new List<Process>();
        try
        {
            await using var server = started;
            Token.WriteFile(Path.Combine(server.RunDir, "token"), credentials.Client!);
            RunEndpoints.Write(server.RunDir, server.Address, server.HttpAddress);
            var status = server.Loop.Status();
            Console.Error.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"run {status.RunId}: {status.Recipe} from step {status.Step} to {status.TargetStep}, coordinator {server.Address}, {workerCount} workers x {threads} threads{(cpus is null ? "" : " on CPUs " + string.Join(" / ", cpus.Select(Worker.CpuAffinity.Format)))}, client token (status, sample) in {Path.Combine(server.RunDir, "token")}; `coordinator status --run {server.RunDir}` finds it"));
            for (var i = 0; i < workerCount; i++)
                // JSON lines stay JSON: no prefix (each worker's events carry its id once it has joined).
                processes.Add(StartWorker(server.Address, credentials.Worker!, threads, logLevel, logFormat == "json" ? "" : $"[worker {i + 1}] ", Console.Error.WriteLine,
                    device: devices[i % devices.Length], logFormat: logFormat, transport: transport, cpus: cpus?[i]));

            var bar = new ProgressBar("train", (long)status.Step, (long)status.TargetStep);
            // The rate excludes the first step (joining, loading, one-time set-up), as `coordinator train`'s does.
            var clock = new Stopwatch();
            var firstStep = status.Step + 1;
            string? failure = null;
            while (!server.Stopped.IsCompleted && !cts.IsCancellationRequested)
            {
                await Task.WhenAny(server.Stopped, Task.Delay(250, CancellationToken.None));
                var s = server.Loop.Status();
                if (!clock.IsRunning && s.Step >= firstStep) clock.Start();
                bar.Update((long)s.Step, $"loss {CliSupport.Format(s.Loss)}, {s.Workers.Count(w => w.State is WorkerState.Idle or WorkerState.Busy)} workers");
                // A worker stopped by the same Ctrl+C (its own SIGINT, exit 130) is no failure of the run.
                var failed = processes.Select((p, k) => (p, k)).FirstOrDefault(x => x.p.HasExited && x.p.ExitCode != 0 && !server.Loop.Completion.IsCompleted && !cts.IsCancellationRequested);
                if (failed.p is not null)
                {
                    failure = $"worker {failed.k + 1} exited with code {failed.p.ExitCode}";
                    break;
                }
            }
            var final = server.Loop.Status();
            await server.StopAsync();
            // Workers exit by themselves once training is complete; give them a moment, then make sure.
            foreach (var p in processes)
                if (!p.WaitForExit(TimeSpan.FromSeconds(failure is null && !cts.IsCancellationRequested ? 15 : 2))) p.Kill(entireProcessTree: true);
            if (failure is not null)
            {
                Console.Error.WriteLine($"error: {failure}; stopped the run at step {final.Step} (resume with --resume {server.RunDir})");
                return CliSupport.ExitFailure;
            }
            if (cts.IsCancellationRequested && !server.Loop.Completion.IsCompletedSuccessfully)
            {
                Console.Error.WriteLine($"stopped at step {final.Step}; resume with --resume {server.RunDir}");
                return signals.ExitCode;
            }
            if (server.Loop.Completion.IsFaulted) return CliSupport.ExitFailure;
            var steps = final.Step - firstStep;
            var rate = steps / clock.Elapsed.TotalSeconds;
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"trained {final.Recipe} to step {final.Step} with {workerCount} workers; final loss {final.Loss:G4}; {rate:G3} steps/s ({1 / rate:G3} s/step); last checkpoint {final.LastCheckpoint}; run folder {server.RunDir}"));
            return CliSupport.ExitOk;
        }
        finally
        {
            foreach (var p in processes)
            {
                if (!p.HasExited) p.Kill(entireProcessTree: true);
                p.Dispose();
            }
        }
    }
}
