using System.Reflection;
using System.Text.Json.Nodes;
using System.Text.Json;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Training;
using DistDiffusion.Model.Checkpoints;
using Google.Protobuf;

namespace DistDiffusion.Coordinator.Monitoring;

/// <summary>
/// The HTTP port's pages besides /metrics: GET / (the dashboard: one self-contained page, no third-party assets) and the
/// JSON and picture it polls: /api/status, /api/history, /api/sample.png. The page needs no token (it holds no data);
/// everything under /api needs the client token, checked by <see cref="AccessMiddleware"/> before this runs.
/// </summary>
public sealed class Dashboard(TrainingLoop loop, RunSetup run)
{
    /// <summary>Paths served without a token.</summary>
    public static bool IsPublic(string path) => path is "/" or "/index.html";

    /// <summary>Paths this class answers (with /metrics, the only ones on the HTTP port).</summary>
    public static bool IsKnown(string path) => IsPublic(path) || path is "/api/status" or "/api/history" or "/api/sample.png" or "/metrics";

    private static readonly Lazy<byte[]> Page = new(() =>
    {
        using var stream = Assembly.GetExecutingAssembly().GetManifestResourceStream("dashboard.html")
            ?? throw new InvalidOperationException("the dashboard page is missing from the coordinator assembly");
        using var copy = new MemoryStream();
        stream.CopyTo(copy);
        return copy.ToArray();
    });

    public async Task<bool> TryServeAsync(HttpContext context)
    {
        var path = context.Request.Path.Value ?? "";
        context.Response.Headers.CacheControl = "no-store";
        switch (path)
        {
            case "/" or "/index.html":
                context.Response.ContentType = "text/html; charset=utf-8";
                context.Response.Headers.ContentSecurityPolicy = "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' blob:";
                await context.Response.Body.WriteAsync(Page.Value, context.RequestAborted);
                return true;
            case "/api/status":
                context.Response.ContentType = "application/json";
                await context.Response.WriteAsync(StatusJson().ToJsonString(), context.RequestAborted);
                return true;
            case "/api/history":
                context.Response.ContentType = "application/json";
                var records = loop.Journal.Tail(2000);
                await context.Response.WriteAsync(JsonSerializer.Serialize(records, HistoryJson), context.RequestAborted);
                return true;
            case "/api/sample.png":
                if (LatestSample() is not { } file)
                {
                    context.Response.StatusCode = StatusCodes.Status404NotFound;
                    return true;
                }
                context.Response.ContentType = "image/png";
                context.Response.Headers["X-Sample-Step"] = Path.GetFileNameWithoutExtension(file);
                await context.Response.Body.WriteAsync(await File.ReadAllBytesAsync(file, context.RequestAborted), context.RequestAborted);
                return true;
            default:
                return false;
        }
    }

    private static readonly JsonSerializerOptions HistoryJson = new() { NumberHandling = System.Text.Json.Serialization.JsonNumberHandling.AllowNamedFloatingPointLiterals };

    private JsonObject StatusJson()
    {
        var status = loop.Status();
        var telemetry = loop.ReadTelemetry();
        var node = JsonNode.Parse(new JsonFormatter(JsonFormatter.Settings.Default.WithFormatDefaultValues(true)).Format(status))!.AsObject();
        node["gradientNorm"] = double.IsFinite(telemetry.GradNorm) ? telemetry.GradNorm : null;
        node["stepSplit"] = new JsonObject
        {
            ["compute"] = telemetry.LastStep.ComputeSeconds,
            ["exchange"] = telemetry.LastStep.ExchangeSeconds,
            ["update"] = telemetry.LastStep.UpdateSeconds,
        };
        if (!double.IsFinite(status.Loss)) node["loss"] = null;
        var checkpoints = new JsonArray();
        foreach (var c in CheckpointStore.List(run.RunDir).TakeLast(20)) checkpoints.Add(new JsonObject { ["step"] = c.Step, ["folder"] = c.Folder });
        node["checkpoints"] = checkpoints;
        node["sample"] = LatestSample() is { } file ? Path.GetFileName(file) : null;
        return node;
    }

    /// <summary>The newest OUT/samples/step-N.png.</summary>
    private string? LatestSample()
    {
        var dir = Path.Combine(run.RunDir, "samples");
        if (!Directory.Exists(dir)) return null;
        return Directory.EnumerateFiles(dir, "step-*.png").OrderBy(f => f, StringComparer.Ordinal).LastOrDefault();
    }
}
