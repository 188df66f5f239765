using System.Security.Cryptography.X509Certificates;
using DistDiffusion.Protocol;
using Grpc.Health.V1;
using Grpc.HealthCheck;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Serilog;
using Serilog.Events;

namespace DistDiffusion.Coordinator.Server;

/// <summary>
/// The coordinator as an ASP.NET Core application on Kestrel (HTTP/2): the Trainer and Coordinator services,
/// grpc.health.v1 and reflection, the token interceptor, Serilog. Used by `coordinator serve`,
/// `coordinator run` and the tests (which listen on port 0).
/// </summary>
public sealed class CoordinatorServer : IAsyncDisposable
{
    /// <summary>Largest message accepted: a 1 MiB tensor chunk plus its framing fields.</summary>
    public const int MaxReceiveMessageBytes = TensorTransport.ChunkBytes + 64 * 1024;

    private readonly WebApplication _app;
    private readonly RunSetup _run;

    private CoordinatorServer(WebApplication app, RunSetup run, Uri address)
    {
        _app = app;
        _run = run;
        Address = address;
    }

    /// <summary>The URL the server listens on (the real port when --listen asked for port 0).</summary>
    public Uri Address { get; }
    public TrainingLoop Loop => _app.Services.GetRequiredService<TrainingLoop>();
    public SamplingCoordinator Sampling => _app.Services.GetRequiredService<SamplingCoordinator>();
    public string RunDir => _run.RunDir;
    /// <summary>Completes when the host stops (training complete without --keep-serving, or shutdown).</summary>
    public Task Stopped => _app.WaitForShutdownAsync();

    /// <summary>
    /// Builds the run and starts listening. <paramref name="options"/> is final (the caller merged appsettings,
    /// environment and flags); <paramref name="token"/> null needs AllowUnauthenticated.
    /// </summary>
    public static async Task<CoordinatorServer> StartAsync(CoordinatorOptions options, string? token, LogEventLevel level = LogEventLevel.Information, string logPrefix = "", CancellationToken ct = default)
    {
        options.Validate();
        if (token is null && !options.AllowUnauthenticated)
            throw new ArgumentException($"no token: give --token-file PATH or set {Names.TokenEnvironmentVariable} (or --allow-unauthenticated to serve without one)");
        var logger = new LoggerConfiguration()
            .MinimumLevel.Is(level)
            .MinimumLevel.Override("Microsoft", LogEventLevel.Warning)
            .MinimumLevel.Override("Grpc", LogEventLevel.Warning)
            .WriteTo.Console(outputTemplate: logPrefix + "{Timestamp:HH:mm:ss.fff} {Level:u3} {Message:lj}{NewLine}{Exception}", standardErrorFromLevel: LogEventLevel.Verbose)
            .CreateLogger();
        var setupLog = new Serilog.Extensions.Logging.SerilogLoggerFactory(logger).CreateLogger<CoordinatorServer>();
        if (token is null) setupLog.LogWarning("Serving WITHOUT authentication (--allow-unauthenticated): anyone who reaches {Listen} can join or read status", options.Listen);
        var run = RunSetup.Create(options, setupLog);
        try
        {
            var builder = WebApplication.CreateSlimBuilder(new WebApplicationOptions { Args = [], ContentRootPath = AppContext.BaseDirectory });
            builder.Services.AddSerilog(logger, dispose: true);
            builder.Services.AddSingleton(options);
            builder.Services.AddSingleton(run);
            builder.Services.AddSingleton(new ServerToken(token));
            builder.Services.AddSingleton<TrainingLoop>();
            builder.Services.AddSingleton<SamplingCoordinator>();
            builder.Services.AddHostedService(s => s.GetRequiredService<TrainingLoop>());
            builder.Services.AddHostedService(s => s.GetRequiredService<SamplingCoordinator>());
            builder.Services.AddGrpc(o =>
            {
                o.MaxReceiveMessageSize = MaxReceiveMessageBytes;
                o.MaxSendMessageSize = ClientChannel.MaxReceiveMessageBytes;
                o.EnableDetailedErrors = false;
                o.Interceptors.Add<TokenInterceptor>();
            });
            builder.Services.AddGrpcReflection();
            builder.Services.AddSingleton<HealthServiceImpl>();
            builder.Services.Configure<HostOptions>(o => o.ShutdownTimeout = TimeSpan.FromSeconds(30));
            var listen = new Uri(options.Listen);
            builder.WebHost.ConfigureKestrel(k =>
            {
                // Parameters and gradients are megabytes per step: windows that small round trips do not throttle.
                k.Limits.Http2.InitialStreamWindowSize = 16 << 20;
                k.Limits.Http2.InitialConnectionWindowSize = 32 << 20;
                k.Limits.Http2.KeepAlivePingDelay = TimeSpan.FromSeconds(20);
                k.Limits.Http2.KeepAlivePingTimeout = TimeSpan.FromSeconds(20);
                void Configure(ListenOptions l)
                {
                    l.Protocols = HttpProtocols.Http2;
                    if (options.TlsCert is not null)
                        l.UseHttps(X509Certificate2.CreateFromPemFile(options.TlsCert, options.TlsKey));
                }
                if (listen.Host is "localhost") k.ListenLocalhost(listen.Port, Configure);
                else if (listen.Host is "0.0.0.0" or "*" or "+" or "[::]") k.ListenAnyIP(listen.Port, Configure);
                else k.Listen(System.Net.IPAddress.Parse(listen.Host.Trim('[', ']')), listen.Port, Configure);
            });
            var app = builder.Build();
            app.MapGrpcService<TrainerService>();
            app.MapGrpcService<StatusService>();
            app.MapGrpcService<SamplingService>();
            app.MapGrpcService<HealthServiceImpl>();
            app.MapGrpcReflectionService();
            var health = app.Services.GetRequiredService<HealthServiceImpl>();
            string[] services = ["", "distdiffusion.v1.Trainer", "distdiffusion.v1.Coordinator", "distdiffusion.v1.Sampler"];
            foreach (var name in services) health.SetStatus(name, HealthCheckResponse.Types.ServingStatus.Serving);
            app.Lifetime.ApplicationStopping.Register(() =>
            {
                foreach (var name in services) health.SetStatus(name, HealthCheckResponse.Types.ServingStatus.NotServing);
            });
            await app.StartAsync(ct);
            var bound = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
            var actual = new UriBuilder(bound) { Host = listen.Host is "localhost" or "0.0.0.0" or "*" or "+" or "[::]" ? "127.0.0.1" : listen.Host }.Uri;
            setupLog.LogInformation("Coordinator listening on {Address} (run folder {RunDir})", actual, run.RunDir);
            return new CoordinatorServer(app, run, actual);
        }
        catch
        {
            run.Dispose();
            throw;
        }
    }

    /// <summary>Stops the host (the loop checkpoints the last completed step).</summary>
    public Task StopAsync() => _app.StopAsync();

    public async ValueTask DisposeAsync()
    {
        await _app.StopAsync();
        await _app.DisposeAsync();
        _run.Dispose();
    }
}
