using System.Net;
using System.Net.Sockets;
using System.Text.Json;
using System.Text.Json.Nodes;
using DistDiffusion.Protocol;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>
/// OUT/endpoints.json, written by `coordinator run` (owner-only, like OUT/token): {"grpc": URL, "http": URL}. Client verbs
/// given `--run DIR` read the coordinator's address from it and the client token from DIR/token.
/// </summary>
internal static class RunEndpoints
{
    public const string FileName = "endpoints.json";
    /// <summary>The gRPC port `run` prefers (the client verbs' default address), when it is free.</summary>
    public const int PreferredGrpcPort = 50051;

    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    public static void Write(string runDir, Uri grpc, Uri? http)
    {
        var json = new JsonObject { ["grpc"] = grpc.ToString().TrimEnd('/'), ["http"] = http?.ToString().TrimEnd('/') };
        var path = Path.Combine(runDir, FileName);
        var options = new FileStreamOptions { Mode = FileMode.Create, Access = FileAccess.Write };
        if (!OperatingSystem.IsWindows()) options.UnixCreateMode = UnixFileMode.UserRead | UnixFileMode.UserWrite;
        using (var stream = new FileStream(path, options))
            JsonSerializer.Serialize(stream, json, Indented);
        if (!OperatingSystem.IsWindows()) File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite);
    }

    /// <summary>
    /// Where a client verb with --checkpoint / --address / --run works: exactly one must be given; --run reads the run
    /// folder's endpoints and token (so --token-file is refused with it). Returns (null, null) for --checkpoint.
    /// </summary>
    /// <param name="here">what --checkpoint means for the verb (named in the error).</param>
    /// <param name="remote">what --address and --run mean for the verb.</param>
    public static (string? Url, string? TokenPath) ResolveTarget(string? checkpoint, string? address, string? run, string? tokenFile, string here, string remote)
    {
        var given = (checkpoint is null ? 0 : 1) + (address is null ? 0 : 1) + (run is null ? 0 : 1);
        if (given != 1)
            throw new UsageException($"give exactly one of --checkpoint DIR ({here}), --address URL or --run DIR ({remote})");
        if (run is null) return (address, tokenFile);
        if (tokenFile is not null) throw new UsageException("--run DIR gives the token: drop --token-file");
        var found = Read(run);
        return (found.Grpc.ToString(), found.TokenFile);
    }

    /// <summary>The gRPC and HTTP addresses and the token file of the run in <paramref name="runDir"/>; a usage error naming what is missing.</summary>
    public static (Uri Grpc, Uri? Http, string TokenFile) Read(string runDir)
    {
        var path = Path.Combine(runDir, FileName);
        if (!File.Exists(path))
            throw new UsageException($"--run {runDir}: no {FileName} there (it is written by `coordinator run` while it runs; for `coordinator serve` give --address URL)");
        JsonNode? node;
        try
        {
            node = JsonNode.Parse(File.ReadAllText(path));
        }
        catch (JsonException e)
        {
            throw new UsageException($"--run {runDir}: {FileName} is not JSON: {e.Message}");
        }
        var grpc = node?["grpc"]?.GetValue<string>() ?? throw new UsageException($"--run {runDir}: {FileName} has no \"grpc\" address");
        var httpText = node?["http"]?.GetValue<string>();
        var address = CliSupport.UserInput(() => ClientChannel.ParseAddress(grpc, $"{FileName} grpc"));
        var http = httpText is null ? null : new Uri(httpText);
        var token = Path.Combine(runDir, "token");
        if (!File.Exists(token)) throw new UsageException($"--run {runDir}: no token file there");
        return (address, http, token);
    }

    /// <summary>True when nothing listens on 127.0.0.1:<paramref name="port"/> (checked by binding it for a moment).</summary>
    public static bool IsFree(int port)
    {
        try
        {
            using var l = new TcpListener(IPAddress.Loopback, port) { ExclusiveAddressUse = true };
            l.Start();
            l.Stop();
            return true;
        }
        catch (SocketException)
        {
            return false;
        }
    }

    /// <summary>Kestrel's "Failed to bind to address ...: address already in use".</summary>
    public static bool IsAddressInUse(Exception e) =>
        e.InnerException is Microsoft.AspNetCore.Connections.AddressInUseException || e.Message.Contains("address already in use", StringComparison.OrdinalIgnoreCase);

    /// <summary>--run DIR as an option of the client verbs.</summary>
    public static System.CommandLine.Option<string?> RunOption() => new("--run")
    {
        Description = $"A `coordinator run` folder: the address comes from its {FileName} and the client token from its token file",
    };
}
