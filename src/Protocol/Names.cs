namespace DistDiffusion.Protocol;

/// <summary>Names every user, script and manifest relies on: defaults, environment variables and metadata keys.</summary>
public static class Names
{
    public const int DefaultPort = 50051;
    /// <summary>Where `coordinator serve` listens and every client verb connects by default.</summary>
    public const string DefaultAddress = "http://127.0.0.1:50051";
    /// <summary>The shared token, for servers and clients alike (alternative: --token-file PATH).</summary>
    public const string TokenEnvironmentVariable = "DISTDIFFUSION_TOKEN";
    /// <summary>Prefix of environment variables that set configuration keys, e.g. DISTDIFFUSION_Coordinator__StepDeadlineSeconds.</summary>
    public const string EnvironmentPrefix = "DISTDIFFUSION_";
    /// <summary>gRPC metadata carrying the token as "Bearer &lt;token&gt;".</summary>
    public const string AuthorizationHeader = "authorization";
    /// <summary>Services served without the token (health checking only).</summary>
    public const string HealthServicePrefix = "/grpc.health.v1.Health/";
    /// <summary>Version of the Trainer stream protocol a worker must speak.</summary>
    public const uint ProtocolVersion = 1;
}
