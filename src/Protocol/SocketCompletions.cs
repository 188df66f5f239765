namespace DistDiffusion.Protocol;

/// <summary>
/// Where .NET runs the continuation of a socket operation that completes later. By default the runtime's epoll thread
/// hands it to the thread pool: one more thread woken per message, which for tensors exchanged every step was the larger
/// part of the exchange's latency (issue 9). With <see cref="Variable"/> = 1 the epoll thread runs it itself, as Kestrel's
/// <c>UnsafePreferInlineScheduling</c> (which the coordinator sets) recommends. Safe here because no code behind a socket
/// read blocks a thread: the worker's session computes on it, but that connection is the only one it reads.
/// </summary>
public static class SocketCompletions
{
    public const string Variable = "DOTNET_SYSTEM_NET_SOCKETS_INLINE_COMPLETIONS";

    /// <summary>Sets <see cref="Variable"/> to 1 for this process unless its environment already sets it. Runs before the first socket (the runtime reads it once).</summary>
    public static void PreferInline()
    {
        if (Environment.GetEnvironmentVariable(Variable) is null) Environment.SetEnvironmentVariable(Variable, "1");
    }
}
