using System.CommandLine;
using DistDiffusion.Model;
using DistDiffusion.Protocol;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Serilog;
using Serilog.Events;

namespace DistDiffusion.Worker;

/// <summary>
/// `worker --coordinator URL [--token-file PATH] [--threads N] [--device D]`: a Generic Host running
/// <see cref="TrainerWorker"/>. Exit codes: 0 training complete or stopped, 1 failure (or the parent given by
/// --exit-with-parent is gone), 2 usage.
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

    private static int Execute(ParseResult p)
    {
        var threads = p.GetValue(ThreadsOption);
        var giveUp = p.GetValue(GiveUpOption);
        if (giveUp < 0 || !double.IsFinite(giveUp)) throw new ArgumentException($"--give-up-after {giveUp}: expected seconds >= 0");
        var parentId = p.GetValue(ExitWithParentOption);
        if (parentId is <= 0) throw new ArgumentException($"--exit-with-parent {parentId}: expected a process id");
        var level = p.GetValue(LogLevelOption)!.ToLowerInvariant() switch
        {
            "debug" => LogEventLevel.Debug,
            "information" or "info" => LogEventLevel.Information,
            "warning" => LogEventLevel.Warning,
            "error" => LogEventLevel.Error,
            var other => throw new ArgumentException($"--log-level {other}: expected debug, information, warning or error"),
        };
        var transport = TrainerTransports.Parse(p.GetValue(TransportOption)!, "--transport");
        var scheduling = p.GetValue(CpuSchedulingOption)!.Trim().ToLowerInvariant() switch
        {
            "batch" => CpuSchedulingClass.Batch,
            "normal" => CpuSchedulingClass.Normal,
            var other => throw new ArgumentException($"--cpu-scheduling {other}: expected batch or normal"),
        };
        var affinity = p.GetValue(CpuAffinityOption) is { } list ? CpuAffinity.Parse(list, "--cpu-affinity") : [];
        CpuAffinity.CheckAllowed(affinity, "--cpu-affinity");   // with the other flags, before this process changes anything
        var format = p.GetValue(LogFormatOption)!;
        if (format.Trim().ToLowerInvariant() is not ("text" or "json")) throw new ArgumentException($"--log-format {format}: expected text or json");
        var options = new WorkerOptions
        {
            Coordinator = ClientChannel.ParseAddress(p.GetValue(CoordinatorOption)!, "--coordinator"),
            Token = Token.ResolveWorker(p.GetValue(TokenFileOption)),
            Threads = threads,
            Device = p.GetValue(DeviceOption)!,
            TlsCaFile = p.GetValue(TlsCaOption),
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
        using var host = builder.Build();
        var worker = host.Services.GetRequiredService<TrainerWorker>();
        using var stopWhenOrphaned = parent?.Gone.Register(() =>
        {
            host.Services.GetRequiredService<ILogger<TrainerWorker>>().LogError(
                "The parent process {Parent} is gone (parent now {Current}): stopping", parent.Parent, ParentWatch.CurrentParent());
            host.Services.GetRequiredService<IHostApplicationLifetime>().StopApplication();
        });
        host.Run();
        return parent is { IsGone: true } ? 1 : worker.ExitCode;
    }
}
