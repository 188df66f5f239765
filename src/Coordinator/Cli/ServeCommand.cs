using System.CommandLine;
using DistDiffusion.Coordinator.Access;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Hosting;
using DistDiffusion.Protocol;
using Serilog.Events;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>
/// `coordinator serve`: the parameter server. Settings come from appsettings.json (next to the executable,
/// then the working directory), environment variables (DISTDIFFUSION_Coordinator__KEY) and flags, later
/// sources winning. The flags' option objects are public so tests can check manifests against them.
/// </summary>
internal static class ServeCommand
{
    public static readonly Option<string?> Listen = new("--listen") { Description = $"URL to listen on (default {Names.DefaultAddress}; http://0.0.0.0:50051 for all interfaces; port 0 picks one)" };
    public static readonly Option<string?> Recipe = new("--recipe") { Description = CliSupport.RecipeDescription + " for a new run" };
    public static readonly Option<string[]> Set = new("--set") { Description = "Override a recipe field, key=value (repeatable)" };
    public static readonly Option<int?> Steps = new("--steps") { Description = "Train until this many steps are done (default: the recipe's)" };
    public static readonly Option<long?> Seed = new("--seed") { Description = "Run seed" };
    public static readonly Option<string?> Out = new("--out") { Description = "Run folder (checkpoints under OUT/checkpoints/<step>/)" };
    public static readonly Option<string?> Resume = new("--resume") { Description = "Continue the run in this folder from its latest checkpoint; with --recipe, start it there when it has none yet" };
    public static readonly Option<string?> WorkerTokenFile = new("--worker-token-file") { Description = $"File holding the worker token: its bearer may join as a worker, nothing else (default: the {Names.WorkerTokenEnvironmentVariable} environment variable)" };
    public static readonly Option<string?> ClientTokenFile = new("--client-token-file") { Description = $"File holding the client token: its bearer may read status and ask for samples and evaluations, not join (default: the {Names.ClientTokenEnvironmentVariable} environment variable)" };
    public static readonly Option<string?> HealthListen = new("--health-listen") { Description = $"Also serve grpc.health.v1.Health/Check, and nothing else, in cleartext on this http:// URL (for probes that speak no TLS, e.g. http://0.0.0.0:{Names.DefaultHealthPort})" };
    public static readonly Option<string?> Http = new("--http") { Description = $"HTTP/1.1 URL for GET /metrics (Prometheus text, client token) and the dashboard (GET /) (default http://127.0.0.1:{DefaultHttpPort}, a free port when that one is taken; none: off)" };
    public static readonly Option<int?> LogEvery = new("--log-every") { Description = "Every N steps: a line in OUT/metrics.jsonl and the loss in the log at Information (default 100)" };
    public static readonly Option<string?> LogFormat = new("--log-format") { Description = "text (default) or json (Serilog's compact JSON, one event per line)" };
    public const int DefaultHttpPort = Names.DefaultHttpPort;
    public static readonly Option<bool> AllowUnauthenticated = new("--allow-unauthenticated") { Description = "Serve without a token (a warning is logged)" };
    public static readonly Option<string?> TlsCert = new("--tls-cert") { Description = "TLS certificate (PEM); with --tls-key the server speaks https" };
    public static readonly Option<string?> TlsKey = new("--tls-key") { Description = "TLS private key (PEM)" };
    public static readonly Option<double?> StepDeadline = new("--step-deadline") { Description = "Seconds a worker has to return its gradient before it is dropped (default 600)" };
    public static readonly Option<double?> LivenessTimeout = new("--liveness-timeout") { Description = "Seconds training with live workers may go without a step before health service distdiffusion.liveness answers NOT_SERVING (default 900; 0: off; keep it above --step-deadline)" };
    public static readonly Option<double?> Heartbeat = new("--heartbeat") { Description = "Seconds between worker heartbeats; silent for 4 of them means dropped (default 5)" };
    public static readonly Option<string?> GradientDtype = new("--gradient-dtype") { Description = "float32 (default, exact) or bfloat16 (half the bytes)" };
    public static readonly Option<int?> MinWorkers = new("--min-workers") { Description = "Wait for this many workers before the first step (default 1)" };
    public static readonly Option<string?> Checkpoint = new("--checkpoint") { Description = "With --sample-only: a checkpoint or run folder whose weights to serve" };
    public static readonly Option<bool> SampleOnly = new("--sample-only") { Description = "Serve samples from --checkpoint without training" };
    public static readonly Option<int?> MaxSamples = new("--max-samples") { Description = "Most samples one request may ask for (default 10000)" };
    public static readonly Option<int?> MaxSampleRequests = new("--max-sample-requests") { Description = "Most sampling requests served at once; more get ResourceExhausted (default 8)" };
    public static readonly Option<double?> SampleDeadline = new("--sample-deadline") { Description = "Seconds a worker has to return the sampling batch it runs before it is dropped (default 600)" };
    public static readonly Option<bool> KeepServing = new("--keep-serving") { Description = "Keep serving after training completes instead of exiting" };
    public static readonly Option<bool?> SharedMemory = new("--shared-memory") { Description = "true (default): workers under this machine's kernel exchange tensors through /dev/shm; false: always on the stream" };
    public static readonly Option<double?> GradientBoundRatio = new("--gradient-bound-ratio") { Description = "Refuse a slice gradient whose per-sample norm is over this many times the median of recent slices; its worker is dropped and the slice recomputed elsewhere (default 100)" };
    public static readonly Option<double?> StragglerFactor = new("--straggler-factor") { Description = "A slice held this many times longer (per sample) than the median of the step's finished slices gets a copy on an idle worker (default 2)" };
    public static readonly Option<double?> VerifyFraction = new("--verify-fraction") { Description = "Share of slices also computed on a second worker and compared bit for bit (default 0)" };
    public static readonly Option<int?> MaxDisagreements = new("--max-disagreements") { Description = "Drop a worker whose bits differ from another's this many times (default 3)" };
    public static readonly Option<int?> KeepCheckpoints = CliSupport.KeepCheckpointsOption();
    public static readonly Option<int?> KeepEvery = CliSupport.KeepEveryOption();
    public static readonly Option<string?> SampleLedger = new("--sample-ledger") { Description = "Diagnostics: append each applied step's dataset indices and epochs to this file (JSON lines)" };
    public static readonly Option<string> LogLevel = new("--log-level") { Description = "debug, information, warning or error", DefaultValueFactory = _ => "information" };

    public static Command Create()
    {
        var tokenFile = new Option<string?>("--token-file") { Description = $"File holding a shared token that admits every role, worker and client (default: the {Names.TokenEnvironmentVariable} environment variable)" };
        var device = CliSupport.DeviceOption();
        var threads = CliSupport.ThreadsOption();
        var cmd = new Command("serve", "Run the coordinator (parameter server) for workers to join, and serve samples")
        {
            Listen, Recipe, Set, Steps, Seed, Out, Resume, tokenFile, WorkerTokenFile, ClientTokenFile, AllowUnauthenticated, TlsCert, TlsKey, HealthListen, Http, LogEvery,
            StepDeadline, LivenessTimeout, Heartbeat, GradientDtype, MinWorkers, KeepServing, Checkpoint, SampleOnly, MaxSamples, device, threads, SharedMemory, GradientBoundRatio, StragglerFactor, VerifyFraction, MaxDisagreements,
            MaxSampleRequests, SampleDeadline, KeepCheckpoints, KeepEvery, SampleLedger, LogLevel, LogFormat,
        };
        cmd.SetAction(p =>
        {
            var flags = new Dictionary<string, string?>();
            void Put<T>(string key, Option<T> o) { if (p.GetResult(o) is { Implicit: false }) flags[$"{CoordinatorOptions.Section}:{key}"] = Convert.ToString(p.GetValue(o), System.Globalization.CultureInfo.InvariantCulture); }
            Put(nameof(CoordinatorOptions.Listen), Listen);
            Put(nameof(CoordinatorOptions.Recipe), Recipe);
            Put(nameof(CoordinatorOptions.Steps), Steps);
            Put(nameof(CoordinatorOptions.Seed), Seed);
            Put(nameof(CoordinatorOptions.Out), Out);
            Put(nameof(CoordinatorOptions.Resume), Resume);
            Put(nameof(CoordinatorOptions.TokenFile), tokenFile);
            Put(nameof(CoordinatorOptions.WorkerTokenFile), WorkerTokenFile);
            Put(nameof(CoordinatorOptions.ClientTokenFile), ClientTokenFile);
            Put(nameof(CoordinatorOptions.HealthListen), HealthListen);
            Put(nameof(CoordinatorOptions.Http), Http);
            Put(nameof(CoordinatorOptions.LogEvery), LogEvery);
            Put(nameof(CoordinatorOptions.LogFormat), LogFormat);
            Put(nameof(CoordinatorOptions.AllowUnauthenticated), AllowUnauthenticated);
            Put(nameof(CoordinatorOptions.TlsCert), TlsCert);
            Put(nameof(CoordinatorOptions.TlsKey), TlsKey);
            Put(nameof(CoordinatorOptions.StepDeadlineSeconds), StepDeadline);
            Put(nameof(CoordinatorOptions.HeartbeatSeconds), Heartbeat);
            Put(nameof(CoordinatorOptions.LivenessTimeoutSeconds), LivenessTimeout);
            Put(nameof(CoordinatorOptions.GradientDtype), GradientDtype);
            Put(nameof(CoordinatorOptions.KeepServing), KeepServing);
            Put(nameof(CoordinatorOptions.MinWorkers), MinWorkers);
            Put(nameof(CoordinatorOptions.Checkpoint), Checkpoint);
            Put(nameof(CoordinatorOptions.SampleOnly), SampleOnly);
            Put(nameof(CoordinatorOptions.MaxSamplesPerRequest), MaxSamples);
            Put(nameof(CoordinatorOptions.Device), device);
            Put(nameof(CoordinatorOptions.Threads), threads);
            Put(nameof(CoordinatorOptions.SharedMemory), SharedMemory);
            Put(nameof(CoordinatorOptions.GradientBoundRatio), GradientBoundRatio);
            Put(nameof(CoordinatorOptions.StragglerFactor), StragglerFactor);
            Put(nameof(CoordinatorOptions.VerifyFraction), VerifyFraction);
            Put(nameof(CoordinatorOptions.MaxDisagreements), MaxDisagreements);
            Put(nameof(CoordinatorOptions.SampleLedger), SampleLedger);
            Put(nameof(CoordinatorOptions.MaxConcurrentSampleRequests), MaxSampleRequests);
            Put(nameof(CoordinatorOptions.SampleBatchDeadlineSeconds), SampleDeadline);
            Put(nameof(CoordinatorOptions.KeepCheckpoints), KeepCheckpoints);
            Put(nameof(CoordinatorOptions.KeepEvery), KeepEvery);
            var sets = p.GetValue(Set) ?? [];
            for (var i = 0; i < sets.Length; i++) flags[$"{CoordinatorOptions.Section}:{nameof(CoordinatorOptions.Set)}:{i}"] = sets[i];
            var options = Configure(flags);
            var level = CliSupport.UserInput(() => CliSupport.ParseLogLevel(p.GetValue(LogLevel)!));
            return Serve(options, level);
        });
        return cmd;
    }

    /// <summary>appsettings.json, then DISTDIFFUSION_* environment variables, then the flags given.</summary>
    internal static CoordinatorOptions Configure(IReadOnlyDictionary<string, string?> flags)
    {
        var config = new ConfigurationBuilder()
            .AddJsonFile(Path.Combine(AppContext.BaseDirectory, "appsettings.json"), optional: true)
            .AddJsonFile(Path.Combine(Directory.GetCurrentDirectory(), "appsettings.json"), optional: true)
            .AddEnvironmentVariables(Names.EnvironmentPrefix)
            .AddInMemoryCollection(flags)
            .Build();
        var options = new CoordinatorOptions();
        CliSupport.UserInput(() =>
        {
            try
            {
                config.GetSection(CoordinatorOptions.Section).Bind(options, b => b.ErrorOnUnknownConfiguration = true);
            }
            catch (InvalidOperationException e)
            {
                throw new ArgumentException("configuration: " + e.Message);
            }
            // --http unset anywhere: the default port, unless taken (then a free one; the log says which).
            DefaultedHttp = options.Http is null;
            options.Http ??= DefaultHttp(options);
            options.Validate();
            return options;
        });
        return options;
    }

    /// <summary>Whether the last <see cref="Configure"/> chose the --http URL itself.</summary>
    [ThreadStatic]
    private static bool DefaultedHttp;

    private static string DefaultHttp(CoordinatorOptions options)
    {
        var taken = new Uri(options.Listen).Port == DefaultHttpPort
            || (options.HealthListen is not null && new Uri(options.HealthListen).Port == DefaultHttpPort)
            || !RunEndpoints.IsFree(DefaultHttpPort);
        return taken ? "http://127.0.0.1:0" : $"http://127.0.0.1:{DefaultHttpPort}";
    }

    private static int Serve(CoordinatorOptions options, LogEventLevel level)
    {
        var credentials = CliSupport.UserInput(() => ServerCredentials.Resolve(options));
        using var cts = new CancellationTokenSource();
        using var signals = StopSignals.Register(cts);
        // Bad settings surface while starting (usage errors, exit 2); later failures are failures (exit 1).
        CoordinatorServer Start() => CliSupport.UserInput(() => CoordinatorServer.StartAsync(options, credentials, level, ct: cts.Token).GetAwaiter().GetResult());
        CoordinatorServer server;
        try
        {
            server = Start();
        }
        catch (IOException e) when (RunEndpoints.IsAddressInUse(e) && options.Http == $"http://127.0.0.1:{DefaultHttpPort}" && DefaultedHttp)
        {
            // The default metrics port was taken between the check and the bind: any free port will do (the log says which).
            options.Http = "http://127.0.0.1:0";
            server = Start();
        }
        return ServeAsync(server, signals, cts.Token).GetAwaiter().GetResult();
    }

    private static async Task<int> ServeAsync(CoordinatorServer started, StopSignals.Registration signals, CancellationToken ct)
    {
        await using var server = started;
        await Task.WhenAny(server.Stopped, Task.Delay(Timeout.Infinite, ct)).ConfigureAwait(false);
        await server.StopAsync();
        if (server.Loop.Completion.IsFaulted) return CliSupport.ExitFailure;
        return ct.IsCancellationRequested && !server.Loop.Completion.IsCompletedSuccessfully ? signals.ExitCode : CliSupport.ExitOk;
    }
}
