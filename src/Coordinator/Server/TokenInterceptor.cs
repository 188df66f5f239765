using DistDiffusion.Protocol;
using Grpc.Core;
using Grpc.Core.Interceptors;
using Microsoft.Extensions.Logging;

namespace DistDiffusion.Coordinator.Server;

/// <summary>The shared token, as the server knows it (null: --allow-unauthenticated).</summary>
public sealed record ServerToken(string? Value);

/// <summary>
/// Requires the shared token (`authorization: Bearer ...`) on every RPC except grpc.health.v1 (probes
/// carry no credentials); anything else gets Unauthenticated before the service sees it.
/// </summary>
public sealed class TokenInterceptor(ServerToken token, ILogger<TokenInterceptor> log) : Interceptor
{
    private void Check(ServerCallContext context)
    {
        if (token.Value is null || context.Method.StartsWith(Names.HealthServicePrefix, StringComparison.Ordinal)) return;
        if (Token.Matches(context.RequestHeaders, token.Value)) return;
        var given = context.RequestHeaders.GetValue(Names.AuthorizationHeader) is null ? "no token" : "a wrong token";
        log.LogWarning("Unauthenticated call to {Method} from {Peer}: {Given}", context.Method, context.Peer, given);
        throw new RpcException(new Status(StatusCode.Unauthenticated,
            $"{context.Method}: {given}; send 'authorization: Bearer <token>' (the coordinator's --token-file or {Names.TokenEnvironmentVariable})"));
    }

    public override Task<TResponse> UnaryServerHandler<TRequest, TResponse>(TRequest request, ServerCallContext context, UnaryServerMethod<TRequest, TResponse> continuation)
    {
        Check(context);
        return continuation(request, context);
    }

    public override Task ServerStreamingServerHandler<TRequest, TResponse>(TRequest request, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, ServerStreamingServerMethod<TRequest, TResponse> continuation)
    {
        Check(context);
        return continuation(request, responseStream, context);
    }

    public override Task<TResponse> ClientStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream, ServerCallContext context, ClientStreamingServerMethod<TRequest, TResponse> continuation)
    {
        Check(context);
        return continuation(requestStream, context);
    }

    public override Task DuplexStreamingServerHandler<TRequest, TResponse>(IAsyncStreamReader<TRequest> requestStream, IServerStreamWriter<TResponse> responseStream, ServerCallContext context, DuplexStreamingServerMethod<TRequest, TResponse> continuation)
    {
        Check(context);
        return continuation(requestStream, responseStream, context);
    }
}
