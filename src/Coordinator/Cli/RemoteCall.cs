using Grpc.Core;
using Grpc.Net.Client;
using DistDiffusion.Protocol;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>
/// What the client verbs that call a coordinator (`sample --address`, `eval --address`) share: the address, token and
/// channel from the user's flags (bad ones are usage errors), Ctrl-C cancelling the call, and one mapping of a failed call:
/// the server refusing the request's values (InvalidArgument, ResourceExhausted) is a usage error naming them, anything else
/// one line from <see cref="CliSupport.DescribeRpcFailure"/> and exit code 1.
/// </summary>
internal static class RemoteCall
{
    /// <summary>The call's endpoint, as <paramref name="body"/> receives it.</summary>
    public sealed record Endpoint(Uri Address, string? Token, GrpcChannel Channel);

    public static int Run(string addressText, string? tokenFile, string? tlsCa, Func<Endpoint, CancellationToken, int> body)
    {
        var address = CliSupport.UserInput(() => ClientChannel.ParseAddress(addressText, "--address"));
        var token = CliSupport.UserInput(() => Token.ResolveClient(tokenFile));
        using var channel = CliSupport.UserInput(() => ClientChannel.Create(address, tlsCa));
        using var cts = new CancellationTokenSource();
        ConsoleCancelEventHandler onCancel = (_, e) => { e.Cancel = true; cts.Cancel(); };
        Console.CancelKeyPress += onCancel;
        try
        {
            return body(new Endpoint(address, token, channel), cts.Token);
        }
        catch (RpcException e) when (e.StatusCode is StatusCode.InvalidArgument or StatusCode.ResourceExhausted)
        {
            throw new UsageException(e.Status.Detail);
        }
        catch (RpcException e)
        {
            Console.Error.WriteLine(CliSupport.DescribeRpcFailure(e, address));
            return CliSupport.ExitFailure;
        }
        finally
        {
            Console.CancelKeyPress -= onCancel;
        }
    }
}
