using DistDiffusion.Coordinator.Access;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Monitoring;
using DistDiffusion.Coordinator.Observe;
using DistDiffusion.Coordinator.Sampling;
using DistDiffusion.Coordinator.Training;
using DistDiffusion.Coordinator.Transport;
using DistDiffusion.Protocol;
using Grpc.Health.V1;
using Grpc.HealthCheck;
using Microsoft.AspNetCore.Connections;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.AspNetCore.Server.Kestrel.Https;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using OpenTelemetry.Metrics;
using Serilog.Events;
using Serilog;

namespace DistDiffusion.Coordinator.Hosting;

/// <summary>
/// The coordinator as an ASP.NET Core application on Kestrel (HTTP/2): the Trainer and Coordinator services,
/// grpc.health.v1 and reflection, the token interceptor, Serilog. Used by `coordinator serve`,
/// `coordinator run` and the tests (which listen on port 0).
/// </summary>
public sealed class CoordinatorServer : IAsyncDisposable
{
    private readonly WebApplication _app;
    private readonly RunSetup _run;
    private readonly Lazy<Task> _stopped;

    private CoordinatorServer(WebApplication app, RunSetup run, Uri address, Uri? healthAddress, Uri? httpAddress)
    {
        _app = app;
        _run = run;
        // One wait for the whole server: each WaitForShutdownAsync registers on the host's stopping token until the host
        // stops, and `run` reads Stopped twice every 250 ms (~480 registrations a minute, kept for the run's life).
        _stopped = new Lazy<Task>(() => app.WaitForShutdownAsync());
        Address = address;
        HealthAddress = healthAddress;
        HttpAddress = httpAddress;
    }

    /// <summary>The HTTP/1.1 port's URL (--http: /metrics and the dashboard), or null.</summary>
    public Uri? HttpAddress { get; }

    /// <summary>The URL the server listens on (the real port when --listen asked for port 0).</summary>
    public Uri Address { get; }
    /// <summary>The cleartext health port's URL (--health-listen), or null.</summary>
    public Uri? HealthAddress { get; }
    public TrainingLoop Loop => _app.Services.GetRequiredService<TrainingLoop>();
    public SamplingCoordinator Sampling => _app.Services.GetRequiredService<SamplingCoordinator>();
    public string RunDir => _run.RunDir;
    /// <summary>Completes when the host stops (training complete without --keep-serving, or shutdown).</summary>
    public Task Stopped => _stopped.Value;

    /// <summary>
    /// Builds the run and starts listening with one shared <paramref name="token"/> for every role (null needs
    /// AllowUnauthenticated).
    /// </summary>
    public static Task<CoordinatorServer> StartAsync(CoordinatorOptions options, string? token, LogEventLevel level = LogEventLevel.Information, string logPrefix = "", CancellationToken ct = default) =>
        StartAsync(options, new ServerCredentials(token), level, logPrefix, ct);

    /// <summary>
    /// Builds the run and starts listening. <paramref name="options"/> is final (the caller merged appsettings,
    /// environment and flags); <paramref name="credentials"/> without any token needs AllowUnauthenticated.
    /// </summary>
    public static async Task<CoordinatorServer> StartAsync(CoordinatorOptions options, ServerCredentials credentials, LogEventLevel level = LogEventLevel.Information, string logPrefix = "", CancellationToken ct = default)
    {
        options.Validate();
        credentials.Validate();
        if (credentials.Open && !options.AllowUnauthenticated)
            throw new ArgumentException($"no token: give --worker-token-file PATH and --client-token-file PATH (or {Names.WorkerTokenEnvironmentVariable} and {Names.ClientTokenEnvironmentVariable}), or one shared token with --token-file PATH or {Names.TokenEnvironmentVariable} (or --allow-unauthenticated to serve without one)");
        // --log-format json: one compact JSON event per line, without the prefix (which would break the JSON).
        var logger = DistDiffusion.Worker.WorkerCli.WriteConsole(new LoggerConfiguration()
            .MinimumLevel.Is(level)
            .MinimumLevel.Override("Microsoft", LogEventLevel.Warning)
            .MinimumLevel.Override("Grpc", LogEventLevel.Warning), options.LogFormat, logPrefix)
            .CreateLogger();
#pragma warning disable CA2000 // the factory does not own the Serilog logger (the host disposes it) and holds nothing else; its logger outlives this method (certificate reloads)
        var setupLog = new Serilog.Extensions.Logging.SerilogLoggerFactory(logger).CreateLogger<CoordinatorServer>();
#pragma warning restore CA2000
        if (credentials.Open) setupLog.LogWarning("Serving WITHOUT authentication (--allow-unauthenticated): anyone who reaches {Listen} can join or read status", options.Listen);
        else setupLog.LogInformation("Tokens: {Tokens}", credentials.Describe());
        if (options.TlsCert is null && !IsLoopback(options.Listen))
            setupLog.LogWarning("Serving cleartext HTTP/2 on {Listen}: tokens, parameters and gradients cross the network unencrypted (give --tls-cert and --tls-key)", options.Listen);
        var run = RunSetup.Create(options, setupLog);
        try
        {
            var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions { Args = [], ContentRootPath = AppContext.BaseDirectory });
            builder.Services.AddSerilog(logger, dispose: true);
            builder.Services.AddSingleton(options);
            builder.Services.AddSingleton(run);
            builder.Services.AddSingleton(credentials);
            builder.Services.AddSingleton<TrainingLoop>();
            builder.Services.AddSingleton<SamplingCoordinator>();
            builder.Services.AddSingleton<PeriodicSamples>();
            builder.Services.AddSingleton<TrainerSocketEndpoint>();
            TensorBoardSink.Register(builder.Services, run.RunDir);   // RUN/tensorboard/ (hook: TensorBoard sink)
            builder.Services.AddHostedService(s => s.GetRequiredService<TrainingLoop>());
            builder.Services.AddHostedService(s => s.GetRequiredService<SamplingCoordinator>());
            builder.Services.AddHostedService<LivenessProbe>();   // health service distdiffusion.liveness (hook: liveness)
            builder.Services.AddGrpc(o =>
            {
                o.MaxReceiveMessageSize = TrainerService.MaxReceiveMessageBytes;
                o.MaxSendMessageSize = ClientChannel.MaxReceiveMessageBytes;
                o.EnableDetailedErrors = false;
            });
            builder.Services.AddGrpcReflection();
            builder.Services.AddSingleton<HealthServiceImpl>();
            builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = TimeSpan.FromSeconds(30));
            var listen = new Uri(options.Listen);
            var certificate = options.TlsCert is null ? null : new ReloadingCertificate(options.TlsCert, options.TlsKey!, setupLog);
            var healthListen = options.HealthListen is null ? null : new Uri(options.HealthListen);
            var healthEndpoints = new List<ListenOptions>();
            var httpListen = options.Http is null or "none" ? null : new Uri(options.Http);
            var httpEndpoints = new List<ListenOptions>();
            if (httpListen is not null)
            {
                builder.Services.AddSingleton<CoordinatorMetrics>();
                builder.Services.AddSingleton<Dashboard>();
                builder.Services.AddOpenTelemetry().WithMetrics(m => CoordinatorMetrics.Instruments(m).AddPrometheusExporter(p => p.ScrapeResponseCacheDurationMilliseconds = 0));
            }
            // Kestrel receives into the free part of its current pool block, 4 KiB by default, after a zero-byte wait:
            // two system calls and a pass through the connection's pipes per 4 KiB of gradient. 64 KiB blocks and no
            // wait cut that to a few dozen calls per megabyte (benchmark-exchange, issue 9).
            builder.Services.AddSingleton<IMemoryPoolFactory<byte>>(new LargeBlockMemoryPoolFactory(LargeBlockMemoryPool.DefaultBlockBytes));
            // Inline scheduling: a connection's reads and writes continue on the thread that completed them instead of
            // passing through Kestrel's I/O queues and then the thread pool (two thread wake-ups per message less). The
            // handlers behind it never block a thread (stream reads and writes are awaited, the training loop runs on its
            // own task), which is what this setting needs. benchmark-exchange, 6 alternating runs: see README.
            builder.WebHost.UseSockets(o =>
            {
                o.WaitForDataBeforeAllocatingBuffer = false;
                o.UnsafePreferInlineScheduling = true;
            });
            builder.WebHost.ConfigureKestrel(k =>
            {
                // Parameters and gradients are megabytes per step: windows that small round trips do not throttle.
                k.Limits.Http2.InitialStreamWindowSize = 16 << 20;
                k.Limits.Http2.InitialConnectionWindowSize = 32 << 20;
                k.Limits.MaxResponseBufferSize = 4 << 20;
                k.Limits.MaxRequestBufferSize = 4 << 20;
                k.Limits.Http2.KeepAlivePingDelay = TimeSpan.FromSeconds(20);
                k.Limits.Http2.KeepAlivePingTimeout = TimeSpan.FromSeconds(20);
                void Configure(ListenOptions l)
                {
                    l.Protocols = HttpProtocols.Http2;
                    if (certificate is not null)
                        l.UseHttps(new HttpsConnectionAdapterOptions { ServerCertificateSelector = (_, _) => certificate.Current });
                    // After TLS: a connection that opens with the worker socket's preface is a worker's Trainer stream.
                    l.Use(TrainerSocketEndpoint.Middleware(() => k.ApplicationServices));
                }
                Listen(k, listen, Configure);
                if (healthListen is not null)
                    Listen(k, healthListen, l =>
                    {
                        l.Protocols = HttpProtocols.Http2;
                        // Marks the connection: AccessMiddleware serves only the health Check on it.
                        l.Use(next => connection =>
                        {
                            connection.Items[AccessMiddleware.HealthPortItem] = true;
                            return next(connection);
                        });
                        healthEndpoints.Add(l);
                    });
                if (httpListen is not null)
                    Listen(k, httpListen, l =>
                    {
                        l.Protocols = HttpProtocols.Http1;
                        if (httpListen.Scheme == Uri.UriSchemeHttps && certificate is not null)
                            l.UseHttps(new HttpsConnectionAdapterOptions { ServerCertificateSelector = (_, _) => certificate.Current });
                        // Marks the connection: AccessMiddleware serves /metrics and the dashboard on it, and no gRPC.
                        l.Use(next => connection =>
                        {
                            connection.Items[AccessMiddleware.HttpPortItem] = true;
                            return next(connection);
                        });
                        httpEndpoints.Add(l);
                    });
            });
            var app = builder.Build();
            app.UseMiddleware<AccessMiddleware>();
            if (httpListen is not null)
            {
                app.Services.GetRequiredService<CoordinatorMetrics>();   // the instruments exist before the first scrape
                app.UseOpenTelemetryPrometheusScrapingEndpoint(c => AccessMiddleware.OnHttpPort(c) && c.Request.Path == "/metrics");
                var dashboard = app.Services.GetRequiredService<Dashboard>();
                app.Use(async (context, next) =>
                {
                    if (AccessMiddleware.OnHttpPort(context))
                    {
                        if (!await dashboard.TryServeAsync(context)) context.Response.StatusCode = StatusCodes.Status404NotFound;
                        return;
                    }
                    await next(context);
                });
            }
            app.MapGrpcService<TrainerService>();
            app.MapGrpcService<StatusService>();
            app.MapGrpcService<SamplingService>();
            app.MapGrpcService<HealthServiceImpl>();
            app.MapGrpcReflectionService();
            var health = app.Services.GetRequiredService<HealthServiceImpl>();
            string[] services = ["", "distdiffusion.v1.Trainer", "distdiffusion.v1.Coordination", "distdiffusion.v1.Sampler"];
            foreach (var name in services) health.SetStatus(name, HealthCheckResponse.Types.ServingStatus.Serving);
            app.Lifetime.ApplicationStopping.Register(() =>
            {
                foreach (var name in services) health.SetStatus(name, HealthCheckResponse.Types.ServingStatus.NotServing);
            });
            await app.StartAsync(ct);
            var bound = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
            var actual = new UriBuilder(bound) { Host = listen.Host is "localhost" or "0.0.0.0" or "*" or "+" or "[::]" ? "127.0.0.1" : listen.Host }.Uri;
            Uri? healthActual = null;
            if (healthListen is not null)
            {
                var port = healthEndpoints.Select(l => l.IPEndPoint?.Port ?? 0).FirstOrDefault(p => p != 0);
                healthActual = new UriBuilder(Uri.UriSchemeHttp, healthListen.Host is "localhost" or "0.0.0.0" or "*" or "+" or "[::]" ? "127.0.0.1" : healthListen.Host, port).Uri;
                setupLog.LogInformation("Health checks (cleartext, grpc.health.v1.Health/Check only) on {HealthAddress}", healthActual);
            }
            Uri? httpActual = null;
            if (httpListen is not null)
            {
                var port = httpEndpoints.Select(l => l.IPEndPoint?.Port ?? 0).FirstOrDefault(p => p != 0);
                httpActual = new UriBuilder(httpListen.Scheme, httpListen.Host is "localhost" or "0.0.0.0" or "*" or "+" or "[::]" ? "127.0.0.1" : httpListen.Host, port).Uri;
                setupLog.LogInformation("Metrics (GET /metrics, client token) and the dashboard (GET /) on {HttpAddress}", httpActual);
            }
            setupLog.LogInformation("Coordinator listening on {Address} (run folder {RunDir})", actual, run.RunDir);
            return new CoordinatorServer(app, run, actual, healthActual, httpActual);
        }
        catch
        {
            run.Dispose();
            throw;
        }
    }

    private static void Listen(KestrelServerOptions k, Uri url, Action<ListenOptions> configure)
    {
        if (url.Host is "localhost") k.ListenLocalhost(url.Port, configure);
        else if (url.Host is "0.0.0.0" or "*" or "+" or "[::]") k.ListenAnyIP(url.Port, configure);
        else k.Listen(System.Net.IPAddress.Parse(url.Host.Trim('[', ']')), url.Port, configure);
    }

    private static bool IsLoopback(string listen) =>
        Uri.TryCreate(listen, UriKind.Absolute, out var u) && (u.Host == "localhost" || (System.Net.IPAddress.TryParse(u.Host.Trim('[', ']'), out var ip) && System.Net.IPAddress.IsLoopback(ip)));

    /// <summary>Stops the host (the loop checkpoints the last completed step).</summary>
    public Task StopAsync() => _app.StopAsync();

    public async ValueTask DisposeAsync()
    {
        await _app.StopAsync();
        await _app.DisposeAsync();
        _run.Dispose();
    }
}
