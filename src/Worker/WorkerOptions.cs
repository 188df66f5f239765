namespace DistDiffusion.Worker;

/// <summary>What a worker needs to know; from its flags and configuration (<see cref="WorkerSettings"/>, <see cref="WorkerCli"/>).</summary>
public sealed record WorkerOptions
{
    /// <summary>The coordinator's URL (http:// or https://).</summary>
    public required Uri Coordinator { get; init; }
    /// <summary>The worker (or shared) token, or null for a coordinator started with --allow-unauthenticated.</summary>
    public string? Token { get; init; }
    /// <summary>CPU threads for torch (0: all cores).</summary>
    public int Threads { get; init; }
    /// <summary>auto, cpu, cuda or cuda:N.</summary>
    public string Device { get; init; } = "auto";
    /// <summary>A CA certificate (PEM) to trust for an https coordinator with a private certificate.</summary>
    public string? TlsCaFile { get; init; }
    /// <summary>Longest wait between connection attempts.</summary>
    public TimeSpan MaxRetryDelay { get; init; } = TimeSpan.FromSeconds(10);
    /// <summary>Bound on every single remote wait that is not a long-lived stream read (connect, join reply).</summary>
    public TimeSpan CallTimeout { get; init; } = TimeSpan.FromSeconds(30);
    /// <summary>Accept a coordinator's shared-memory offer (only made under the same kernel).</summary>
    public bool SharedMemory { get; init; } = true;
    /// <summary>How the Trainer stream travels: the worker socket (falling back to gRPC when the address does not speak it) or gRPC.</summary>
    public DistDiffusion.Protocol.TrainerTransport Transport { get; init; } = DistDiffusion.Protocol.TrainerTransport.Socket;
    /// <summary>Give up after this long without a successful join (zero: never).</summary>
    public TimeSpan GiveUpAfter { get; init; } = TimeSpan.Zero;
}

/// <summary>
/// The worker's flags as configuration keys, bound from section "Worker": appsettings.json (beside the executable, then in
/// the working directory), then environment variables (DISTDIFFUSION_Worker__Threads=2, DISTDIFFUSION_Worker__LogLevel=debug),
/// then the flags given, later sources winning (as `coordinator serve` reads section "Coordinator"). Each key is its flag's
/// name in PascalCase, its default the flag's; <see cref="WorkerCli"/> checks the values as it checks the flags.
/// </summary>
public sealed class WorkerSettings
{
    public const string Section = "Worker";

    /// <summary>--coordinator: the coordinator's URL.</summary>
    public string Coordinator { get; set; } = DistDiffusion.Protocol.Names.DefaultAddress;
    /// <summary>--token-file: the worker (or shared) token's file (else DISTDIFFUSION_WORKER_TOKEN, then DISTDIFFUSION_TOKEN).</summary>
    public string? TokenFile { get; set; }
    /// <summary>--threads: CPU threads for torch (0: all cores).</summary>
    public int Threads { get; set; }
    /// <summary>--device: auto, cpu, cuda or cuda:N.</summary>
    public string Device { get; set; } = "auto";
    /// <summary>--tls-ca: CA certificate(s) (PEM) to trust for an https coordinator.</summary>
    public string? TlsCa { get; set; }
    /// <summary>--transport: socket or grpc.</summary>
    public string Transport { get; set; } = "socket";
    /// <summary>--give-up-after: seconds without reaching the coordinator before exiting with an error (0: keep trying).</summary>
    public double GiveUpAfter { get; set; }
    /// <summary>--exit-with-parent: exit once the process with this id, the worker's parent, is gone.</summary>
    public int? ExitWithParent { get; set; }
    /// <summary>--cpu-scheduling: batch or normal.</summary>
    public string CpuScheduling { get; set; } = "batch";
    /// <summary>--cpu-affinity: the CPUs this worker's threads may run on, e.g. 0-3,8.</summary>
    public string? CpuAffinity { get; set; }
    /// <summary>--log-level: debug, information, warning or error.</summary>
    public string LogLevel { get; set; } = "information";
    /// <summary>--log-format: text or json.</summary>
    public string LogFormat { get; set; } = "text";
}
