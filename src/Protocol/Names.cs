namespace DistDiffusion.Protocol;

/// <summary>Names every user, script and manifest relies on: defaults, environment variables and metadata keys.</summary>
public static class Names
{
    public const int DefaultPort = 50051;
    /// <summary>Where `coordinator serve` listens and every client verb connects by default.</summary>
    public const string DefaultAddress = "http://127.0.0.1:50051";
    /// <summary>
    /// The shared token: on the coordinator it admits every role (alternative: --token-file PATH); a worker or client
    /// without a token of its own role presents it.
    /// </summary>
    public const string TokenEnvironmentVariable = "DISTDIFFUSION_TOKEN";
    /// <summary>The worker token: the coordinator admits its bearer to the worker RPCs only (alternative: --worker-token-file PATH); workers present it.</summary>
    public const string WorkerTokenEnvironmentVariable = "DISTDIFFUSION_WORKER_TOKEN";
    /// <summary>The client token: the coordinator admits its bearer to status, sampling and reflection only (alternative: --client-token-file PATH); `status` and `sample` present it.</summary>
    public const string ClientTokenEnvironmentVariable = "DISTDIFFUSION_CLIENT_TOKEN";
    /// <summary>Prefix of environment variables that set configuration keys, e.g. DISTDIFFUSION_Coordinator__StepDeadlineSeconds.</summary>
    public const string EnvironmentPrefix = "DISTDIFFUSION_";
    /// <summary>gRPC metadata carrying the token as "Bearer &lt;token&gt;".</summary>
    public const string AuthorizationHeader = "authorization";
    /// <summary>The one method served without a token (Kubernetes probes carry none).</summary>
    public const string HealthCheckMethod = "/grpc.health.v1.Health/Check";
    /// <summary>Health watching: a long-lived stream, so it needs a token (of any role).</summary>
    public const string HealthWatchMethod = "/grpc.health.v1.Health/Watch";
    /// <summary>The cleartext port `serve --health-listen` opens for probes next to a TLS listener (native gRPC probes speak no TLS).</summary>
    public const int DefaultHealthPort = 50054;
    /// <summary>The HTTP/1.1 port of `serve --http` (GET /metrics, the dashboard); also what the manifests use.</summary>
    public const int DefaultHttpPort = 50052;
    /// <summary>
    /// Version of the Trainer stream protocol a worker must speak. 2: a shared-memory payload is checked by its region's
    /// write sequence (TensorHeader.shared_sequence), not by a checksum. 3: TensorHeader.checksum is XXH3 (64-bit), not
    /// XxHash64, so a worker of either version would refuse every tensor of the other.
    /// </summary>
    public const uint ProtocolVersion = 3;
}
