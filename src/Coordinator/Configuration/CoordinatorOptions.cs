using System.Globalization;
using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;

namespace DistDiffusion.Coordinator.Configuration;

/// <summary>
/// Settings of `coordinator serve`, bound from the configuration section "Coordinator": appsettings.json,
/// then environment variables (DISTDIFFUSION_Coordinator__StepDeadlineSeconds=...), then CLI flags.
/// </summary>
public sealed class CoordinatorOptions
{
    public const string Section = "Coordinator";

    /// <summary>Kestrel listen URL (http:// or https://; port 0 picks a free port).</summary>
    public string Listen { get; set; } = Names.DefaultAddress;
    /// <summary>Run folder: checkpoints under RUN/checkpoints/&lt;step&gt;/.</summary>
    public string? Out { get; set; }
    /// <summary>Recipe name for a new run.</summary>
    public string? Recipe { get; set; }
    /// <summary>Recipe overrides, key=value.</summary>
    public string[] Set { get; set; } = [];
    /// <summary>Train until this many steps are done (null: the recipe's).</summary>
    public int? Steps { get; set; }
    public long? Seed { get; set; }
    /// <summary>Continue the run in this folder from its latest checkpoint (a fresh run there when it has none and a recipe is given).</summary>
    public string? Resume { get; set; }
    /// <summary>File holding the shared token, which admits every role (else DISTDIFFUSION_TOKEN).</summary>
    public string? TokenFile { get; set; }
    /// <summary>File holding the worker token, which admits the worker RPCs only (else DISTDIFFUSION_WORKER_TOKEN).</summary>
    public string? WorkerTokenFile { get; set; }
    /// <summary>File holding the client token, which admits status, sampling and reflection only (else DISTDIFFUSION_CLIENT_TOKEN).</summary>
    public string? ClientTokenFile { get; set; }
    /// <summary>Serve without a token (logs a warning).</summary>
    public bool AllowUnauthenticated { get; set; }
    /// <summary>TLS: PEM certificate and key; https listen URLs need them.</summary>
    public string? TlsCert { get; set; }
    public string? TlsKey { get; set; }
    /// <summary>
    /// A second, cleartext (http://) listener serving grpc.health.v1.Health/Check and nothing else, for probes that
    /// speak no TLS (Kubernetes' native gRPC probes) next to an https <see cref="Listen"/>. Null: none.
    /// </summary>
    public string? HealthListen { get; set; }
    /// <summary>
    /// HTTP/1.1 listener for GET /metrics (Prometheus text) and the dashboard (GET /); null: none. `serve` defaults to
    /// http://127.0.0.1:50052 (a free port when that one is taken); "none" turns it off.
    /// </summary>
    public string? Http { get; set; }
    /// <summary>Console log format: text, or json (Serilog's compact JSON, one event per line).</summary>
    public string LogFormat { get; set; } = "text";
    /// <summary>Every this many steps: a line in OUT/metrics.jsonl and the loss in the log at Information.</summary>
    public int LogEvery { get; set; } = 100;
    /// <summary>A worker that has not returned its gradient this long after the assignment is dropped.</summary>
    public double StepDeadlineSeconds { get; set; } = 600;
    /// <summary>Health service distdiffusion.liveness turns NOT_SERVING when training with live workers makes no progress this long (0: off).</summary>
    public double LivenessTimeoutSeconds { get; set; } = 900;
    /// <summary>How often workers send heartbeats; a worker silent for 4 intervals is dropped.</summary>
    public double HeartbeatSeconds { get; set; } = 5;
    /// <summary>Bound on waiting for a worker's Join and on each write to a stream.</summary>
    public double CallTimeoutSeconds { get; set; } = 30;
    /// <summary>Gradient encoding the workers use: float32 (exact) or bfloat16 (half the bytes).</summary>
    public string GradientDtype { get; set; } = "float32";
    /// <summary>After training completes, keep serving (status, sampling) instead of exiting.</summary>
    public bool KeepServing { get; set; }
    /// <summary>Wait for this many workers before the first step (later steps run with whoever is live).</summary>
    public int MinWorkers { get; set; } = 1;
    /// <summary>With <see cref="SampleOnly"/>: the checkpoint (or run folder) whose weights to serve.</summary>
    public string? Checkpoint { get; set; }
    /// <summary>Serve samples from <see cref="Checkpoint"/> without training.</summary>
    public bool SampleOnly { get; set; }
    /// <summary>Most samples one Sample request may ask for.</summary>
    public int MaxSamplesPerRequest { get; set; } = 10_000;
    /// <summary>How long a Sample request waits for a worker when none is connected before failing with Unavailable.</summary>
    public double SampleWaitSeconds { get; set; } = 30;
    /// <summary>Most Sample requests served at once; more get ResourceExhausted.</summary>
    public int MaxConcurrentSampleRequests { get; set; } = 8;
    /// <summary>A worker that has not returned the sampling batch it runs this long after starting it is dropped (its batches go to others).</summary>
    public double SampleBatchDeadlineSeconds { get; set; } = 600;
    /// <summary>Device for the optimizer state (the coordinator computes no gradients).</summary>
    public string Device { get; set; } = "cpu";
    public int Threads { get; set; }
    /// <summary>
    /// Offer workers under the same kernel a /dev/shm segment, so tensors move as one memcpy each way instead of through
    /// the stream (headers, with the regions' write sequences, still go on the stream). Remote workers always use the stream.
    /// </summary>
    public bool SharedMemory { get; set; } = true;
    /// <summary>
    /// A slice gradient whose per-sample norm exceeds this many times the median of recent slices is refused, its worker
    /// dropped and the slice recomputed elsewhere (see SliceGuard); a second worker agreeing makes it a real spike.
    /// </summary>
    public double GradientBoundRatio { get; set; } = DefaultGradientBoundRatio;
    public const double DefaultGradientBoundRatio = 100;
    /// <summary>
    /// A slice held longer than this many times the median time (per sample) of the step's finished slices gets a copy
    /// on an idle worker (or its halves on two); the first result is used, the other must have the same bits.
    /// </summary>
    public double StragglerFactor { get; set; } = 2;
    /// <summary>...and held at least this long (so that millisecond jitter does not start copies).</summary>
    public double StragglerMinimumSeconds { get; set; } = 0.05;
    /// <summary>Share of slices also computed by a second worker and compared bit for bit (0: none).</summary>
    public double VerifyFraction { get; set; }
    /// <summary>A worker whose bits differ from another's this many times is dropped.</summary>
    public int MaxDisagreements { get; set; } = 3;
    /// <summary>
    /// Diagnostics: append one JSON line per applied step (step, dataset indices, epochs) to this file, so a benchmark can
    /// count the samples every epoch saw. A step redone after a restart appends again (the later line is the one kept).
    /// </summary>
    public string? SampleLedger { get; set; }
    /// <summary>How many of the newest checkpoints to keep (older ones are deleted once a new one is written and verified).</summary>
    public int KeepCheckpoints { get; set; } = CheckpointRetention.DefaultKeepLast;
    /// <summary>Also keep, for good, every checkpoint whose step is a multiple of this (null: none).</summary>
    public int? KeepEvery { get; set; }

    /// <summary>The checkpoint retention these settings ask for.</summary>
    public CheckpointRetention Retention() => new(KeepCheckpoints, KeepEvery);

    public double HeartbeatTimeoutSeconds => HeartbeatSeconds * 4;

    public DType ParseGradientDtype() => GradientDtype.Trim().ToLowerInvariant() switch
    {
        "float32" or "fp32" => DType.Float32,
        "bfloat16" or "bf16" => DType.Bfloat16,
        _ => throw new ArgumentException($"gradient dtype '{GradientDtype}': expected float32 or bfloat16"),
    };

    /// <summary>Checks the numbers; throws naming the bad one.</summary>
    public void Validate()
    {
        if (!(StepDeadlineSeconds > 0)) throw new ArgumentException($"step deadline {StepDeadlineSeconds} s: expected > 0");
        if (!(HeartbeatSeconds > 0)) throw new ArgumentException($"heartbeat interval {HeartbeatSeconds} s: expected > 0");
        if (!(CallTimeoutSeconds > 0)) throw new ArgumentException($"call timeout {CallTimeoutSeconds} s: expected > 0");
        if (SampleOnly && Checkpoint is null) throw new ArgumentException("--sample-only needs --checkpoint DIR (the weights to serve)");
        if (!SampleOnly && Checkpoint is not null) throw new ArgumentException("--checkpoint DIR serves a trained model: add --sample-only (to continue training use --resume DIR)");
        if (MaxSamplesPerRequest < 1) throw new ArgumentException($"max samples per request {MaxSamplesPerRequest}: expected >= 1");
        if (!(SampleWaitSeconds > 0)) throw new ArgumentException($"sample wait {SampleWaitSeconds} s: expected > 0");
        if (!(GradientBoundRatio >= 1) || !double.IsFinite(GradientBoundRatio)) throw new ArgumentException($"--gradient-bound-ratio {GradientBoundRatio}: expected a finite number >= 1");
        if (!(StragglerFactor >= 1) || !double.IsFinite(StragglerFactor)) throw new ArgumentException($"--straggler-factor {StragglerFactor}: expected a finite number >= 1");
        if (!(StragglerMinimumSeconds >= 0) || !double.IsFinite(StragglerMinimumSeconds)) throw new ArgumentException($"straggler minimum {StragglerMinimumSeconds} s: expected a finite number >= 0");
        if (!(VerifyFraction >= 0 && VerifyFraction <= 1)) throw new ArgumentException($"--verify-fraction {VerifyFraction}: expected a share in [0, 1]");
        if (MaxDisagreements < 1) throw new ArgumentException($"--max-disagreements {MaxDisagreements}: expected at least 1");
        if (MaxConcurrentSampleRequests < 1) throw new ArgumentException($"--max-sample-requests {MaxConcurrentSampleRequests}: expected at least 1");
        if (!(SampleBatchDeadlineSeconds > 0)) throw new ArgumentException($"--sample-deadline {SampleBatchDeadlineSeconds} s: expected > 0");
        if (MinWorkers < 1) throw new ArgumentException($"--min-workers {MinWorkers}: expected at least 1");
        if (LogFormat.Trim().ToLowerInvariant() is not ("text" or "json")) throw new ArgumentException($"--log-format {LogFormat}: expected text or json");
        if (LogEvery < 1) throw new ArgumentException($"--log-every {LogEvery}: expected at least 1");
        ValidateLivenessTimeout(LivenessTimeoutSeconds);
        if (Http is not null && Http != "none")
        {
            var http = ClientChannel.ParseAddress(Http, "--http");
            if (http.Scheme == Uri.UriSchemeHttps && TlsCert is null) throw new ArgumentException($"--http {Http}: https needs --tls-cert and --tls-key");
            if (http.Port != 0 && http.Port == new Uri(Listen).Port) throw new ArgumentException($"--http {Http}: port {http.Port} is --listen's port too");
            if (http.Port != 0 && HealthListen is not null && http.Port == new Uri(HealthListen).Port) throw new ArgumentException($"--http {Http}: port {http.Port} is --health-listen's port too");
        }
        if (Steps is < 0) throw new ArgumentException($"--steps {Steps}: expected a count >= 0");
        ParseGradientDtype();
        Retention();
        ClientChannel.ParseAddress(Listen, "--listen");
        if ((TlsCert is null) != (TlsKey is null)) throw new ArgumentException("--tls-cert and --tls-key go together");
        if (Listen.StartsWith("https", StringComparison.OrdinalIgnoreCase) && TlsCert is null)
            throw new ArgumentException($"--listen {Listen}: https needs --tls-cert and --tls-key");
        if (!Listen.StartsWith("https", StringComparison.OrdinalIgnoreCase) && TlsCert is not null)
            throw new ArgumentException($"--listen {Listen}: with --tls-cert the coordinator speaks TLS; listen on an https:// URL");
        if (HealthListen is not null)
        {
            var health = ClientChannel.ParseAddress(HealthListen, "--health-listen");
            if (health.Scheme != Uri.UriSchemeHttp)
                throw new ArgumentException($"--health-listen {HealthListen}: the health port is cleartext (probes speak no TLS): use an http:// URL");
            var main = new Uri(Listen);
            if (health.Port != 0 && health.Port == main.Port)
                throw new ArgumentException($"--health-listen {HealthListen}: port {health.Port} is --listen's port too");
        }
    }

    /// <summary>Checks a --liveness-timeout value in seconds: zero (off) or a finite positive number.</summary>
    internal static void ValidateLivenessTimeout(double seconds)
    {
        if (!(seconds >= 0) || !double.IsFinite(seconds))
            throw new ArgumentException(string.Create(CultureInfo.InvariantCulture, $"--liveness-timeout {seconds}: expected seconds, a finite number > 0 (or 0 to turn the check off)"));
    }
}
