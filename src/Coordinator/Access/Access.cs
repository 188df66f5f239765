using System.Globalization;
using System.Text;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Monitoring;
using DistDiffusion.Protocol;
using Grpc.Core;
using Microsoft.AspNetCore.Connections.Features;
using Microsoft.Extensions.Logging;

namespace DistDiffusion.Coordinator.Access;

/// <summary>What a token lets its bearer call.</summary>
[Flags]
public enum Roles
{
    None = 0,
    /// <summary>Join as a worker: Trainer.Connect (parameters in, gradients out).</summary>
    Worker = 1,
    /// <summary>Status, samples, evaluation and reflection: Coordinator.GetStatus, Sampler.Sample, Sampler.Evaluate, server reflection.</summary>
    Client = 2,
    Any = Worker | Client,
}

/// <summary>
/// The tokens the coordinator accepts: the shared one (every role; what one-token set-ups and `coordinator run`'s
/// clients use), a worker token and a client token. All null: --allow-unauthenticated.
/// </summary>
public sealed record ServerCredentials(string? Shared, string? Worker = null, string? Client = null)
{
    /// <summary>No token at all: every call is admitted (--allow-unauthenticated).</summary>
    public bool Open => Shared is null && Worker is null && Client is null;

    /// <summary>The roles an `authorization` header value carries (None: no token, or one the coordinator does not know).</summary>
    public Roles RolesOf(string? authorization)
    {
        // Every comparison runs, so the time taken does not tell which token came close.
        var roles = Roles.None;
        if (Shared is not null && Token.Matches(authorization, Shared)) roles |= Roles.Any;
        if (Worker is not null && Token.Matches(authorization, Worker)) roles |= Roles.Worker;
        if (Client is not null && Token.Matches(authorization, Client)) roles |= Roles.Client;
        return roles;
    }

    /// <summary>Refuses tokens that would blur the roles: any two of them equal.</summary>
    public void Validate()
    {
        if (Worker is not null && Worker == Client)
            throw new ArgumentException("the worker token and the client token are the same: a client could join as a worker (give each role its own token, or one shared token with --token-file)");
        if (Shared is not null && (Shared == Worker || Shared == Client))
            throw new ArgumentException($"the shared token (--token-file or {Names.TokenEnvironmentVariable}) equals the {(Shared == Worker ? "worker" : "client")} token: the shared token admits every role");
    }

    /// <summary>The tokens of `serve`: each from its file option, else its environment variable.</summary>
    public static ServerCredentials Resolve(CoordinatorOptions options, Func<string, string?>? environment = null)
    {
        var credentials = new ServerCredentials(
            Token.Resolve(options.TokenFile, "--token-file", [Names.TokenEnvironmentVariable], environment),
            Token.Resolve(options.WorkerTokenFile, "--worker-token-file", [Names.WorkerTokenEnvironmentVariable], environment),
            Token.Resolve(options.ClientTokenFile, "--client-token-file", [Names.ClientTokenEnvironmentVariable], environment));
        credentials.Validate();
        return credentials;
    }

    /// <summary>For logs: which roles have a token.</summary>
    public string Describe()
    {
        var parts = new List<string>();
        if (Worker is not null) parts.Add("a worker token");
        if (Client is not null) parts.Add("a client token");
        if (Shared is not null) parts.Add("a shared token (every role)");
        return parts.Count == 0 ? "no token" : string.Join(", ", parts);
    }
}

/// <summary>Which role each RPC needs. A method not listed here is refused to everyone (PermissionDenied).</summary>
public static class AccessRules
{
    private static readonly Dictionary<string, Roles> Methods = new(StringComparer.Ordinal)
    {
        ["/distdiffusion.v1.Trainer/Connect"] = Roles.Worker,
        ["/distdiffusion.v1.Coordination/GetStatus"] = Roles.Client,
        ["/distdiffusion.v1.Sampler/Sample"] = Roles.Client,
        ["/distdiffusion.v1.Sampler/Evaluate"] = Roles.Client,
        [Names.HealthCheckMethod] = Roles.None,
        [Names.HealthWatchMethod] = Roles.Any,
        ["/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"] = Roles.Client,
        ["/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"] = Roles.Client,
    };

    /// <summary>The roles that may call <paramref name="method"/> (a gRPC path); None for the open health check; null for no known method.</summary>
    public static Roles? For(string method) => Methods.TryGetValue(method, out var roles) ? roles : null;

    public static IReadOnlyCollection<string> Known => Methods.Keys;

    public static string Describe(Roles roles) => roles switch
    {
        Roles.Worker => "the worker role",
        Roles.Client => "the client role",
        Roles.Any => "a worker or client token",
        _ => "no role",
    };
}

/// <summary>
/// Authenticates every call on its headers, before any of its request is read: the token's roles against
/// <see cref="AccessRules"/> (Unauthenticated without a known token, PermissionDenied for the wrong role). Only the
/// health Check needs no token, and an unauthenticated Check is cut off after <see cref="OpenCallLimit"/>, so nobody
/// without a token holds a stream. On the health port (--health-listen) only the Check is served.
/// </summary>
public sealed class AccessMiddleware(RequestDelegate next, ServerCredentials credentials, ILogger<AccessMiddleware> log)
{
    /// <summary>The longest a call without a token may last (a Check answers at once; this bounds one whose request never arrives).</summary>
    public static readonly TimeSpan OpenCallLimit = TimeSpan.FromSeconds(10);

    /// <summary>Key of the connection item that marks a connection to the health port.</summary>
    public const string HealthPortItem = "distdiffusion.health-port";

    /// <summary>Key of the connection item that marks a connection to the HTTP/1.1 port (--http: /metrics and the dashboard).</summary>
    public const string HttpPortItem = "distdiffusion.http-port";

    public static bool OnHttpPort(HttpContext context) => context.Features.Get<IConnectionItemsFeature>()?.Items.ContainsKey(HttpPortItem) == true;

    public async Task InvokeAsync(HttpContext context)
    {
        if (OnHttpPort(context))
        {
            await Http(context);
            return;
        }
        var method = context.Request.Path.Value ?? "";
        var onHealthPort = context.Features.Get<IConnectionItemsFeature>()?.Items.ContainsKey(HealthPortItem) == true;
        if (onHealthPort && method != Names.HealthCheckMethod)
        {
            Refuse(context, StatusCode.PermissionDenied, $"{Quote(method)}: the health port serves {Names.HealthCheckMethod} only");
            return;
        }
        var required = AccessRules.For(method);
        if (credentials.Open)
        {
            await next(context);
            return;
        }
        if (required == Roles.None)
        {
            await Bounded(context);
            return;
        }
        var authorization = context.Request.Headers.Authorization.ToString();
        var roles = credentials.RolesOf(authorization.Length == 0 ? null : authorization);
        if (roles == Roles.None)
        {
            var given = authorization.Length == 0 ? "no token" : "a wrong token";
            log.LogWarning("Unauthenticated call to {Method} from {Peer}: {Given}", Quote(method), Peer(context), given);
            Refuse(context, StatusCode.Unauthenticated,
                $"{Quote(method)}: {given}; send 'authorization: Bearer <token>' (the coordinator's --worker-token-file, --client-token-file or --token-file)");
            return;
        }
        if (required is not { } needed || (roles & needed) == 0)
        {
            var has = AccessRules.Describe(roles);
            var message = required is null
                ? $"{Quote(method)}: no such method, and no role may call it"
                : required == Roles.Worker
                    ? $"{Quote(method)} needs the worker role; this token has {has} (workers present the coordinator's --worker-token-file)"
                    : $"{Quote(method)} needs {AccessRules.Describe(required.Value)}; this token has {has} (clients present the coordinator's --client-token-file)";
            log.LogWarning("Refused {Method} from {Peer}: the token has {Roles}", Quote(method), Peer(context), has);
            Refuse(context, StatusCode.PermissionDenied, message);
            return;
        }
        await next(context);
    }

    /// <summary>
    /// The HTTP port: GETs of the dashboard page (no token; it holds no data), and of /metrics and /api/* with the client
    /// (or shared) token as Bearer, else 401 and nothing else. Any other path or method: 404 / 405.
    /// </summary>
    private async Task Http(HttpContext context)
    {
        var path = context.Request.Path.Value ?? "";
        if (!Dashboard.IsKnown(path))
        {
            context.Response.StatusCode = StatusCodes.Status404NotFound;
            return;
        }
        if (!HttpMethods.IsGet(context.Request.Method) && !HttpMethods.IsHead(context.Request.Method))
        {
            context.Response.StatusCode = StatusCodes.Status405MethodNotAllowed;
            context.Response.Headers.Allow = "GET, HEAD";
            return;
        }
        if (!Dashboard.IsPublic(path) && !credentials.Open)
        {
            var authorization = context.Request.Headers.Authorization.ToString();
            if ((credentials.RolesOf(authorization.Length == 0 ? null : authorization) & Roles.Client) == 0)
            {
                log.LogWarning("Refused HTTP {Path} from {Peer}: {Given}", Quote(path), Peer(context), authorization.Length == 0 ? "no token" : "not a client token");
                context.Response.StatusCode = StatusCodes.Status401Unauthorized;
                context.Response.Headers.WWWAuthenticate = "Bearer";
                return;
            }
        }
        await next(context);
    }

    /// <summary>Runs an unauthenticated call, aborting it once it has lasted <see cref="OpenCallLimit"/>.</summary>
    private async Task Bounded(HttpContext context)
    {
        using var limit = new CancellationTokenSource(OpenCallLimit);
        await using var abort = limit.Token.Register(context.Abort);
        await next(context);
    }

    /// <summary>Answers a gRPC call with a status and no messages (a trailers-only response), without reading its request.</summary>
    private static void Refuse(HttpContext context, StatusCode code, string message)
    {
        context.Response.StatusCode = StatusCodes.Status200OK;
        context.Response.ContentType = "application/grpc";
        context.Response.Headers["grpc-status"] = ((int)code).ToString(CultureInfo.InvariantCulture);
        context.Response.Headers["grpc-message"] = PercentEncode(message);
    }

    /// <summary>grpc-message encoding: UTF-8 bytes outside printable ASCII, and '%', as %XX.</summary>
    private static string PercentEncode(string text)
    {
        var sb = new StringBuilder(text.Length);
        foreach (var b in Encoding.UTF8.GetBytes(text))
        {
            if (b is >= 0x20 and <= 0x7E && b != (byte)'%') sb.Append((char)b);
            else sb.Append(CultureInfo.InvariantCulture, $"%{b:X2}");
        }
        return sb.ToString();
    }

    /// <summary>A request path as it may be logged: the caller chose it.</summary>
    private static string Quote(string method) => WireText.Escape(method, 200);

    private static string Peer(HttpContext context) =>
        context.Connection.RemoteIpAddress is { } ip ? $"{ip}:{context.Connection.RemotePort}" : "unknown";
}
