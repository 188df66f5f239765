namespace DistDiffusion.Worker;

/// <summary>What a worker needs to know; set by flags (see <see cref="WorkerCli"/>).</summary>
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
