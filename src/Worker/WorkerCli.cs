using System.CommandLine;
using System.Runtime.InteropServices;
using DistDiffusion.Model;
using DistDiffusion.Protocol;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Serilog;
using Serilog.Events;

namespace DistDiffusion.Worker;

/// <summary>
/// `worker --coordinator URL [--token-file PATH] [--threads N] [--device D]`: a Generic Host running
/// <see cref="TrainerWorker"/>. Settings come from appsettings.json (section "Worker", next to the executable, then the
/// working directory), environment variables (DISTDIFFUSION_Worker__KEY) and flags, later sources winning, as for
/// `coordinator serve` (<see cref="WorkerSettings"/>). Exit codes: 0 training complete, 1 failure (or the parent given by
/// --exit-with-parent is gone), 2 usage, and 128 + the signal's number when SIGINT (130), SIGQUIT (131) or SIGTERM (143)
/// stopped it, as for the coordinator's `run`, `serve` and `train` (<see cref="SignalExitCode"/>).
/// </summary>
public static class WorkerCli
{
    public static readonly Option<string> CoordinatorOption = new("--coordinator")
    {
        Description = "The coordinator's URL",
        DefaultValueFactory = _ => Names.DefaultAddress,
    };
    public static readonly Option<string?> TokenFileOption = new("--token-file")
    {
        Description = $"File holding the worker token (the coordinator's --worker-token-file), or the shared one (default: the {Names.WorkerTokenEnvironmentVariable} environment variable, else {Names.TokenEnvironmentVariable})",
    };
    public static readonly Option<int> ThreadsOption = new("--threads")
    {
        Description = "CPU threads for torch (0: all cores)",
        DefaultValueFactory = _ => 0,
    };
    public static readonly Option<string> DeviceOption = new("--device")
    {
        Description = "Device: auto (CUDA when available, else CPU), cpu, cuda or cuda:N",
        DefaultValueFactory = _ => "auto",
    };
    public static readonly Option<string?> TlsCaOption = new("--tls-ca")
    {
        Description = "CA certificate(s) (PEM) to trust for an https coordinator with a private certificate (e.g. cert-manager's ca.crt); the certificate must also name the host dialled",
    };
    public static readonly Option<string> TransportOption = new("--transport")
    {
        Description = "How the Trainer stream travels: socket (length-prefixed frames on the coordinator's port, several times faster for tensors; falls back to grpc when the address does not speak it) or grpc (HTTP/2, e.g. through a gRPC-only proxy)",
        DefaultValueFactory = _ => "socket",
    };
    public static readonly Option<double> GiveUpOption = new("--give-up-after")
    {
        Description = "Exit with an error after this many seconds without reaching the coordinator (0: keep trying)",
        DefaultValueFactory = _ => 0,
    };
    public static readonly Option<int?> ExitWithParentOption = new("--exit-with-parent")
    {
        Description = "Exit (code 1) within a second or so once the process with this id, which must be this worker's parent, is gone (`coordinator run` passes its own)",
    };
    public static readonly Option<string> CpuSchedulingOption = new("--cpu-scheduling")
    {
        Description = "batch (default: Linux's SCHED_BATCH, so a worker that wakes does not preempt the thread running on its core, e.g. the coordinator's next to it) or normal",
        DefaultValueFactory = _ => "batch",
    };
    public static readonly Option<string?> CpuAffinityOption = new("--cpu-affinity")
    {
        Description = "CPUs this worker's threads may run on, e.g. 1 or 0-3,8 (default: every CPU the process may use; `coordinator run` gives each worker CPUs of its own when they fit)",
    };
    public static readonly Option<string> LogLevelOption = new("--log-level")
    {
        Description = "Minimum log level: debug, information, warning, error",
        DefaultValueFactory = _ => "information",
    };

    public static readonly Option<string> LogFormatOption = new("--log-format")
    {
        Description = "text (default) or json (Serilog's compact JSON, one event per line)",
        DefaultValueFactory = _ => "text",
    };

    /// <summary>The console sink for --log-format: text lines, or compact JSON (one event per line); everything on stderr.</summary>
    public static LoggerConfiguration WriteConsole(LoggerConfiguration c, string format, string prefix = "") =>
        format.Trim().ToLowerInvariant() switch
        {
            "text" => c.WriteTo.Console(outputTemplate: prefix + "{Timestamp:HH:mm:ss.fff} {Level:u3} {Message:lj}{NewLine}{Exception}", formatProvider: System.Globalization.CultureInfo.CurrentCulture, standardErrorFromLevel: LogEventLevel.Verbose),
            "json" => c.WriteTo.Console(new Serilog.Formatting.Compact.CompactJsonFormatter(), standardErrorFromLevel: LogEventLevel.Verbose),
            _ => throw new ArgumentException($"--log-format {format}: expected text or json"),
        };

    public static RootCommand Build()
    {
        var root = new RootCommand("DistDiffusion worker: joins a coordinator, computes gradients of its share of each step and serves sampling work")
        {
            CoordinatorOption, TokenFileOption, ThreadsOption, DeviceOption, TlsCaOption, TransportOption, GiveUpOption, ExitWithParentOption, CpuSchedulingOption, CpuAffinityOption, LogLevelOption, LogFormatOption,
        };
        root.SetAction(p => Execute(p));
        return root;
    }

    public static int Run(string[] args)
    {
        var parsed = Build().Parse(args);
        if (parsed.Errors.Count > 0)
        {
            Console.Error.WriteLine($"error: {parsed.Errors[0].Message} (see --help)");
            return 2;
        }
        try
        {
            return parsed.Invoke(new InvocationConfiguration { EnableDefaultExceptionHandler = false });
        }
        catch (ArgumentException e)
        {
            Console.Error.WriteLine($"error: {e.Message}");
            return 2;
        }
    }

    /// <summary>
    /// The exit code of a process that <paramref name="signal"/> asked to stop, and that stopped cleanly: 128 + the signal's
    /// number, what a shell reports for a process the signal ended (and what torchrun's and Python's users see for Ctrl+C:
    /// 130), so a supervisor or script tells an interrupted run from a finished one (0) and from a failure (1). The
    /// coordinator's verbs use the same.
    /// </summary>
    public static int SignalExitCode(PosixSignal signal) => signal switch
    {
        PosixSignal.SIGINT => 130,
        PosixSignal.SIGQUIT => 131,
        PosixSignal.SIGTERM => 143,
        _ => throw new ArgumentOutOfRangeException(nameof(signal), signal, "expected SIGINT, SIGQUIT or SIGTERM"),
    };

    /// <summary>The signals that stop a worker (and the coordinator's long-running verbs) cleanly.</summary>
    public static IReadOnlyList<PosixSignal> StopSignals { get; } = [PosixSignal.SIGINT, PosixSignal.SIGQUIT, PosixSignal.SIGTERM];

    /// <summary>
    /// appsettings.json (beside the executable, then in the working directory), then DISTDIFFUSION_* environment variables,
    /// then the flags given; section <see cref="WorkerSettings.Section"/>. An unknown key or a value of the wrong type is a
    /// usage error naming it.
    /// </summary>
    internal static WorkerSettings Configure(IReadOnlyDictionary<string, string?> flags)
    {
        var config = new ConfigurationBuilder()
            .AddJsonFile(Path.Combine(AppContext.BaseDirectory, "appsettings.json"), optional: true)
            .AddJsonFile(Path.Combine(Directory.GetCurrentDirectory(), "appsettings.json"), optional: true)
            .AddEnvironmentVariables(Names.EnvironmentPrefix)
            .AddInMemoryCollection(flags)
            .Build();
        var settings = new WorkerSettings();
        try
        {
            config.GetSection(WorkerSettings.Section).Bind(settings, b => b.ErrorOnUnknownConfiguration = true);
        }
        catch (InvalidOperationException e)
        {
            throw new ArgumentException("configuration: " + e.Message, e);
        }
        return settings;
    }

    /// <summary>The flags given on the command line (not their defaults), as configuration keys of <see cref="WorkerSettings"/>.</summary>
    private static Dictionary<string, string?> Flags(ParseResult p)
    {
        var flags = new Dictionary<string, string?>();
        void Put<T>(string key, Option<T> o)
        {
            if (p.GetResult(o) is { Implicit: false })
                flags[$"{WorkerSettings.Section}:{key}"] = Convert.ToString(p.GetValue(o), System.Globalization.CultureInfo.InvariantCulture);
        }
        Put(nameof(WorkerSettings.Coordinator), CoordinatorOption);
        Put(nameof(WorkerSettings.TokenFile), TokenFileOption);
        Put(nameof(WorkerSettings.Threads), ThreadsOption);
        Put(nameof(WorkerSettings.Device), DeviceOption);
        Put(nameof(WorkerSettings.TlsCa), TlsCaOption);
        Put(nameof(WorkerSettings.Transport), TransportOption);
        Put(nameof(WorkerSettings.GiveUpAfter), GiveUpOption);
        Put(nameof(WorkerSettings.ExitWithParent), ExitWithParentOption);
        Put(nameof(WorkerSettings.CpuScheduling), CpuSchedulingOption);
        Put(nameof(WorkerSettings.CpuAffinity), CpuAffinityOption);
        Put(nameof(WorkerSettings.LogLevel), LogLevelOption);
        Put(nameof(WorkerSettings.LogFormat), LogFormatOption);
        return flags;
    }

    private static int Execute(ParseResult p)
    {
        var s = Configure(Flags(p));
        var threads = s.Threads;
        var giveUp = s.GiveUpAfter;
        if (giveUp < 0 || !double.IsFinite(giveUp)) throw new ArgumentException($"--give-up-after {giveUp}: expected seconds >= 0");
        var parentId = s.ExitWithParent;
        if (parentId is <= 0) throw new ArgumentException($"--exit-with-parent {parentId}: expected a process id");
        var level = s.LogLevel.ToLowerInvariant() switch
        {
            "debug" => LogEventLevel.Debug,
            "information" or "info" => LogEventLevel.Information,
            "warning" => LogEventLevel.Warning,
            "error" => LogEventLevel.Error,
            var other => throw new ArgumentException($"--log-level {other}: expected debug, information, warning or error"),
        };
        var transport = TrainerTransports.Parse(s.Transport, "--transport");
        var scheduling = s.CpuScheduling.Trim().ToLowerInvariant() switch
        {
            "batch" => CpuSchedulingClass.Batch,
            "normal" => CpuSchedulingClass.Normal,
            var other => throw new ArgumentException($"--cpu-scheduling {other}: expected batch or normal"),
        };
        var affinity = s.CpuAffinity is { } list ? CpuAffinity.Parse(list, "--cpu-affinity") : [];
        CpuAffinity.CheckAllowed(affinity, "--cpu-affinity");   // with the other flags, before this process changes anything
        var format = s.LogFormat;
        if (format.Trim().ToLowerInvariant() is not ("text" or "json")) throw new ArgumentException($"--log-format {format}: expected text or json");
        var options = new WorkerOptions
        {
            Coordinator = ClientChannel.ParseAddress(s.Coordinator, "--coordinator"),
            Token = Token.ResolveWorker(s.TokenFile),
            Threads = threads,
            Device = s.Device,
            TlsCaFile = s.TlsCa,
            GiveUpAfter = TimeSpan.FromSeconds(giveUp),
            Transport = transport,
        };
        // Before anything slow (loading libtorch): a worker whose parent is already gone must not start at all.
        using var parent = parentId is { } id ? ParentWatch.Start(id) : null;
        if (parent is { IsGone: true })
        {
            Console.Error.WriteLine($"error: --exit-with-parent {parent.Parent}: that process is gone (this worker's parent is now {ParentWatch.CurrentParent()?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "unknown"})");
            return 1;
        }
        // Before libtorch starts its threads: they inherit the class from this one.
        CpuScheduling.Apply(scheduling);
        CpuAffinity.Apply(affinity, "--cpu-affinity");
        var device = TorchRuntime.ResolveDevice(options.Device, threads);

        var builder = Host.CreateApplicationBuilder();
        builder.Services.AddSerilog(c => WriteConsole(c
            .MinimumLevel.Is(level)
            .MinimumLevel.Override("Microsoft", LogEventLevel.Warning)
            .MinimumLevel.Override("Grpc", LogEventLevel.Warning), format));
        builder.Services.AddSingleton(options);
        builder.Services.AddSingleton(device);
        builder.Services.AddSingleton<TrainerWorker>();
        builder.Services.AddHostedService(s => s.GetRequiredService<TrainerWorker>());
        builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = TimeSpan.FromSeconds(10));
        // In place of the console lifetime, which stops the host on the same signals but leaves no trace of which.
        builder.Services.AddSingleton(s => new SignalLifetime(s.GetRequiredService<IHostApplicationLifetime>()));
        builder.Services.AddSingleton<IHostLifetime>(s => s.GetRequiredService<SignalLifetime>());
        using var host = builder.Build();
        var worker = host.Services.GetRequiredService<TrainerWorker>();
        var lifetime = host.Services.GetRequiredService<IHostApplicationLifetime>();
        var signals = host.Services.GetRequiredService<SignalLifetime>();
        using var stopWhenOrphaned = parent?.Gone.Register(() =>
        {
            host.Services.GetRequiredService<ILogger<TrainerWorker>>().LogError(
                "The parent process {Parent} is gone (parent now {Current}): stopping", parent.Parent, ParentWatch.CurrentParent());
            lifetime.StopApplication();
        });
        host.Run();
        if (parent is { IsGone: true }) return 1;
        return signals.StoppedBy is { } by && worker.ExitCode == 0 ? SignalExitCode(by) : worker.ExitCode;
    }

    /// <summary>
    /// The worker host's lifetime: SIGINT, SIGQUIT and SIGTERM stop the host, and the first of them is kept for the exit
    /// code, unless the host was already stopping by itself (training complete, a failure, the parent gone).
    /// </summary>
    private sealed class SignalLifetime(IHostApplicationLifetime lifetime) : IHostLifetime, IDisposable
    {
        private const int NoSignal = int.MinValue;   // PosixSignal values are negative (SIGINT is -2)
        private readonly List<PosixSignalRegistration> _registrations = [];
        private int _stoppedBy = NoSignal;

        /// <summary>The signal that stopped the worker, if one did.</summary>
        public PosixSignal? StoppedBy => Volatile.Read(ref _stoppedBy) is var s and not NoSignal ? (PosixSignal)s : null;

        public Task WaitForStartAsync(CancellationToken cancellationToken)
        {
            foreach (var signal in StopSignals) _registrations.Add(PosixSignalRegistration.Create(signal, OnSignal));
            return Task.CompletedTask;
        }

        private void OnSignal(PosixSignalContext context)
        {
            context.Cancel = true;
            if (!lifetime.ApplicationStopping.IsCancellationRequested) Interlocked.CompareExchange(ref _stoppedBy, (int)context.Signal, NoSignal);
            lifetime.StopApplication();
        }

        public Task StopAsync(CancellationToken cancellationToken) => Task.CompletedTask;

        public void Dispose()
        {
            foreach (var r in _registrations) r.Dispose();
        }
    }
}
