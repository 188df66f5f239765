using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;
using Grpc.Core;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using static TorchSharp.torch;

namespace DistDiffusion.Worker;

/// <summary>
/// The worker process's service: connects to the coordinator with retry and exponential back-off, runs a
/// <see cref="WorkerSession"/>, and reconnects by itself when the stream breaks or the coordinator restarts.
/// Stops the host when the coordinator says training is complete, or on an error retrying cannot fix
/// (wrong token, incompatible protocol, a dataset that differs from the coordinator's).
/// </summary>
internal sealed class TrainerWorker : BackgroundService
{
    private readonly WorkerOptions _options;
    private readonly Device _device;
    private readonly IHostApplicationLifetime _lifetime;
    private readonly ILogger<TrainerWorker> _log;
    private WorkerModel? _model;

    public TrainerWorker(WorkerOptions options, Device device, IHostApplicationLifetime lifetime, ILogger<TrainerWorker> log)
    {
        _options = options;
        _device = device;
        _lifetime = lifetime;
        _log = log;
    }

    /// <summary>Process exit code: 0 done, 1 failed.</summary>
    public int ExitCode { get; private set; }

    protected override async Task ExecuteAsync(CancellationToken stoppingToken)
    {
        // Torch work runs on this loop: leave the host's start-up path at once.
        await Task.Yield();
        using var channel = ClientChannel.Create(_options.Coordinator, _options.TlsCaFile);
        var client = new PooledTrainerClient(channel);
        TrainerConnect grpc = (headers, ct) => Task.FromResult(client.ConnectPooled(headers, cancellationToken: ct));
        // After the socket met something else at the address (a proxy passing only HTTP/2), that one connection uses gRPC;
        // the next one tries the socket again (a coordinator answering slowly once should not cost the fast path for good).
        var fallback = false;
        var socket = SocketTrainerCall.Connector(_options.Coordinator, _options.TlsCaFile, _options.CallTimeout);
        var delay = TimeSpan.FromMilliseconds(250);
        var lastJoin = DateTime.UtcNow;
        try
        {
            while (!stoppingToken.IsCancellationRequested)
            {
                var session = new WorkerSession(_options, _device, ModelFor, _log);
                try
                {
                    var useSocket = _options.Transport == TrainerTransport.Socket && !fallback;
                    fallback = false;
                    _log.LogInformation("Connecting to {Coordinator} ({Transport})", _options.Coordinator, useSocket ? "worker socket" : "gRPC stream");
                    var outcome = await session.RunAsync(useSocket ? socket : grpc, stoppingToken);
                    if (outcome == SessionOutcome.Finished)
                        return;
                }
                catch (SocketMismatchException e)
                {
                    _log.LogWarning("No worker socket at {Coordinator} ({Reason}): using the gRPC stream", _options.Coordinator, e.Message);
                    fallback = true;
                    continue;
                }
                catch (RpcException e) when (e.StatusCode is StatusCode.Unauthenticated or StatusCode.PermissionDenied)
                {
                    _log.LogError("Coordinator refused this worker: {Status} {Detail} (check --token-file, {WorkerTokenVariable} or {TokenVariable}: a worker presents the worker token)", e.StatusCode, e.Status.Detail, Names.WorkerTokenEnvironmentVariable, Names.TokenEnvironmentVariable);
                    ExitCode = 1;
                    return;
                }
                catch (ProtocolException e) when (e.Code == StatusCode.FailedPrecondition)
                {
                    _log.LogError("Cannot work for this coordinator: {Reason}", e.Message);
                    ExitCode = 1;
                    return;
                }
                catch (RpcException e) when (e.StatusCode == StatusCode.FailedPrecondition && !session.Joined)
                {
                    _log.LogError("Coordinator rejected the join: {Detail}", e.Status.Detail);
                    ExitCode = 1;
                    return;
                }
                catch (OperationCanceledException) when (stoppingToken.IsCancellationRequested)
                {
                    return;
                }
                catch (Exception e) when (e is RpcException or IOException or TimeoutException or OperationCanceledException or HttpRequestException or ProtocolException)
                {
                    _log.LogWarning("Connection to {Coordinator} lost: {Error}", _options.Coordinator, Describe(e));
                }
                if (session.Joined)
                {
                    delay = TimeSpan.FromMilliseconds(250);
                    lastJoin = DateTime.UtcNow;
                }
                if (_options.GiveUpAfter > TimeSpan.Zero && DateTime.UtcNow - lastJoin > _options.GiveUpAfter)
                {
                    _log.LogError("No coordinator at {Coordinator} for {Seconds:F0} s: giving up", _options.Coordinator, _options.GiveUpAfter.TotalSeconds);
                    ExitCode = 1;
                    return;
                }
                _log.LogInformation("Retrying in {Delay:F1} s", delay.TotalSeconds);
                await Task.Delay(delay, stoppingToken);
                delay = TimeSpan.FromTicks(Math.Min(_options.MaxRetryDelay.Ticks, delay.Ticks * 2));
            }
        }
        catch (OperationCanceledException) when (stoppingToken.IsCancellationRequested)
        {
            // Ctrl+C / SIGTERM
        }
#pragma warning disable CA1031 // the host's last resort: any failure is logged and becomes the exit code
        catch (Exception e)
#pragma warning restore CA1031
        {
            _log.LogError(e, "Worker failed");
            ExitCode = 1;
        }
        finally
        {
            _model?.Dispose();
            _model = null;
            _lifetime.StopApplication();
        }
    }

    /// <summary>
    /// The model is the loop's: <see cref="ExecuteAsync"/> disposes it as it ends, so here it is normally gone already.
    /// It is disposed here only when the loop never ran or has ended; should the host dispose this service while the
    /// loop still runs (its shutdown timeout passed during a long torch call), freeing the model's native memory
    /// under that call would crash the process, so the loop's own finally is left to do it.
    /// </summary>
    public override void Dispose()
    {
        if (ExecuteTask is null || ExecuteTask.IsCompleted)
        {
            _model?.Dispose();
            _model = null;
        }
        base.Dispose();
    }

    private WorkerModel ModelFor(string recipeJson)
    {
        if (_model is not null && _model.RecipeJson == recipeJson) return _model;
        _model?.Dispose();
        _model = null;
        _model = WorkerModel.Load(recipeJson, _device);
        return _model;
    }

    private static string Describe(Exception e) => e is RpcException r ? $"{r.StatusCode}: {r.Status.Detail}" : e.Message;
}
