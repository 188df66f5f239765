using System.Collections.Concurrent;
using DistDiffusion.Coordinator.Access;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Hosting;
using DistDiffusion.Coordinator.Training;
using DistDiffusion.Coordinator.Transport;
using DistDiffusion.Protocol.V1;
using Grpc.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging.Abstractions;
using Microsoft.Extensions.Logging;

namespace DistDiffusion.Fuzz.Targets;

/// <summary>
/// One real in-process coordinator (Kestrel on a loopback port, its training loop and sampling coordinator) for every
/// input of a process: starting one takes seconds, so targets reuse it. Nothing is reset between inputs: a worker each
/// input joins is dropped when its input ends, and the run then waits for the next; the inputs' step and version
/// placeholders follow the run wherever it is. A tiny swiss-roll MLP, so a valid push is a few hundred floats.
/// </summary>
public sealed class FuzzCoordinator
{
    public const string WorkerToken = "fuzz-worker-token-5d1e93";
    public const string ClientToken = "fuzz-client-token-a04c77";

    private static readonly Lazy<FuzzCoordinator> Shared = new(() => new FuzzCoordinator(), LazyThreadSafetyMode.ExecutionAndPublication);

    public static FuzzCoordinator Instance => Shared.Value;

    private FuzzCoordinator()
    {
        Options = new CoordinatorOptions
        {
            Listen = "http://127.0.0.1:0",
            Out = Path.Combine(FuzzTarget.Scratch("coordinator"), "run"),
            Recipe = "swissroll",
            Set = ["hidden-size=4", "hidden-layers=1", "time-embedding-size=4", "batch-size=8", "micro-batches=2", "synthetic-size=64", "timesteps=10", "checkpoint-every=0", "sample-every=0"],
            Steps = 1_000_000_000,
            Seed = 11,
            MinWorkers = 1,
            StepDeadlineSeconds = 600,
            HeartbeatSeconds = 30,
            CallTimeoutSeconds = 10,
            SharedMemory = false,
        };
        Credentials = new ServerCredentials(null, WorkerToken, ClientToken);
        Server = CoordinatorServer.StartAsync(Options, Credentials, Serilog.Events.LogEventLevel.Fatal).GetAwaiter().GetResult();
        var services = new ServiceCollection();
        services.AddSingleton(Server.Loop);
        services.AddSingleton(Server.Sampling);
        services.AddSingleton(Options);
        services.AddSingleton(Credentials);
        services.AddSingleton<ILoggerFactory>(NullLoggerFactory.Instance);
        services.AddSingleton(typeof(ILogger<>), typeof(NullLogger<>));
        services.AddSingleton<TrainerSocketEndpoint>();
        Services = services.BuildServiceProvider();
    }

    public CoordinatorOptions Options { get; }
    public ServerCredentials Credentials { get; }
    public CoordinatorServer Server { get; }
    public IServiceProvider Services { get; }
    public TrainingLoop Loop => Server.Loop;

    /// <summary>The training state an input may change only by a push the coordinator acknowledges as applied.</summary>
    public (long Steps, ulong Checksum) State => (Loop.StepsDone, Loop.ParameterChecksum);

    /// <summary>Waits until the loop has handled every event posted before this call (a weights snapshot is answered in turn).</summary>
    public async Task BarrierAsync()
    {
        using var limit = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        await Loop.SnapshotAsync(false, limit.Token);
    }

    /// <summary>Waits until the loop reports worker <paramref name="id"/> dropped or left (it handled the worker's departure).</summary>
    public async Task AwaitGoneAsync(string id)
    {
        var until = DateTime.UtcNow.AddSeconds(10);
        while (Loop.Status().Workers.FirstOrDefault(w => w.Id == id) is { } w && w.State is not (WorkerState.Dropped or WorkerState.Left))
        {
            if (DateTime.UtcNow > until) throw new FuzzFindingException($"worker {id} is still {w.State} 10 s after its stream ended");
            await Task.Delay(1);
        }
    }

    /// <summary>
    /// The check after an input: the training state changed only if the coordinator told this input's worker a push was
    /// applied, and a push it called applied did change it.
    /// </summary>
    public static void CheckState(string target, (long Steps, ulong Checksum) before, (long Steps, ulong Checksum) after, IEnumerable<CoordinatorMessage> answers)
    {
        var applied = answers.Any(m => m.KindCase == CoordinatorMessage.KindOneofCase.Ack && m.Ack.Applied);
        if (after != before && !applied)
            throw new FuzzFindingException($"{target}: the training state changed (step {before.Steps} -> {after.Steps}, checksum {before.Checksum:x16} -> {after.Checksum:x16}) without an applied push");
        if (applied && after.Steps <= before.Steps)
            throw new FuzzFindingException($"{target}: a push was acknowledged as applied, but the run stayed at step {after.Steps}");
    }

    /// <summary>An RpcException the coordinator ends a call with: a status and a detail saying why.</summary>
    public static bool IsStatus(Exception e) => e is RpcException r && !string.IsNullOrWhiteSpace(r.Status.Detail) && r.StatusCode != StatusCode.Unknown;
}

/// <summary>A server stream that keeps what the coordinator writes; <see cref="Arrived"/> wakes whoever waits for a kind.</summary>
internal sealed class RecordingWriter : IServerStreamWriter<CoordinatorMessage>
{
    public ConcurrentQueue<CoordinatorMessage> Messages { get; } = new();
    public SemaphoreSlim Arrived { get; } = new(0);
    public WriteOptions? WriteOptions { get; set; }

    public Task WriteAsync(CoordinatorMessage message, CancellationToken cancellationToken) => WriteAsync(message);

    public Task WriteAsync(CoordinatorMessage message)
    {
        Messages.Enqueue(message);
        Arrived.Release();
        return Task.CompletedTask;
    }

    /// <summary>The first message of <paramref name="kind"/>, waiting up to <paramref name="limit"/>; null if none came.</summary>
    public async Task<CoordinatorMessage?> AwaitAsync(CoordinatorMessage.KindOneofCase kind, TimeSpan limit, Func<CoordinatorMessage, bool>? where = null)
    {
        var until = DateTime.UtcNow + limit;
        while (true)
        {
            if (Messages.FirstOrDefault(m => m.KindCase == kind && (where?.Invoke(m) ?? true)) is { } found) return found;
            var left = until - DateTime.UtcNow;
            if (left <= TimeSpan.Zero || !await Arrived.WaitAsync(left)) return Messages.FirstOrDefault(m => m.KindCase == kind && (where?.Invoke(m) ?? true));
        }
    }
}
