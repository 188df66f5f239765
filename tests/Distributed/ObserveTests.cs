using System.Net.Http.Headers;
using System.Net;
using System.Text.Json.Nodes;
using System.Text.Json;
using DistDiffusion.Coordinator.Access;
using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Coordinator.Observe;

namespace DistDiffusion.Tests.Distributed;

/// <summary>Issue 11, "see a run": endpoints.json and --run, status --watch, metrics.jsonl and loss.png, GET /metrics, the dashboard's API.</summary>
[Collection(ClusterCollection.Name)]
public sealed class ObserveTests() : TempFolderTest("dd-observe")
{
    private static string[] Sets(int checkpointEvery = 0) => [.. Cluster.Sets(checkpointEvery).SelectMany(s => new[] { "--set", s })];

    private static JsonObject ReadEndpoints(string runDir) => JsonNode.Parse(File.ReadAllText(Path.Combine(runDir, RunEndpoints.FileName)))!.AsObject();

    /// <summary>A `coordinator run` long enough to look at; disposing kills it and its workers.</summary>
    private static async Task<CoordinatorProcess> StartLongRun(string runDir)
    {
        var run = new CoordinatorProcess(["run", "--workers", "1", "--recipe", "swissroll", "--steps", "1000000", "--out", runDir, "--log-every", "5", .. Sets()]);
        await Cluster.WaitUntil(() => File.Exists(Path.Combine(runDir, RunEndpoints.FileName)) || run.Process.HasExited, TimeSpan.FromSeconds(60), "endpoints.json", () => run.Output);
        Assert.False(run.Process.HasExited, run.Output);
        var token = File.ReadAllText(Path.Combine(runDir, "token")).Trim();
        await Cluster.WaitUntil(() => Cluster.Step(new Uri(ReadEndpoints(runDir)["grpc"]!.GetValue<string>()), token) >= 2, TimeSpan.FromSeconds(60), "training to start", () => run.Output);
        return run;
    }

    [Fact(Timeout = 240_000)]
    public async Task RunWritesItsEndpointsAndTheClientVerbsFindItByFolder()
    {
        var runDir = Path.Combine(Dir, "run");
        using var run = await StartLongRun(runDir);
        var endpoints = ReadEndpoints(runDir);
        var grpc = new Uri(endpoints["grpc"]!.GetValue<string>());
        var http = new Uri(endpoints["http"]!.GetValue<string>());
        Assert.Equal("127.0.0.1", grpc.Host);
        Assert.Equal("127.0.0.1", http.Host);
        Assert.NotEqual(grpc.Port, http.Port);
        if (!OperatingSystem.IsWindows()) Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(Path.Combine(runDir, RunEndpoints.FileName)));

        var (code, output, err) = CliHarness.Run(["status", "--run", runDir]);
        Assert.True(code == 0, err);
        Assert.Contains("recipe swissroll, training", output, StringComparison.Ordinal);
        (code, output, err) = CliHarness.Run(["sample", "--run", runDir, "--n", "8", "--out", Path.Combine(Dir, "s.npy")]);
        Assert.True(code == 0, err + output);
        Assert.True(File.Exists(Path.Combine(Dir, "s.npy")));
        (code, _, err) = CliHarness.Run(["status", "--run", runDir, "--address", grpc.ToString()]);
        Assert.Equal(CliSupport.ExitUsage, code);
        Assert.Contains("--run DIR gives the address", err, StringComparison.Ordinal);
        (code, _, err) = CliHarness.Run(["status", "--run", Dir]);
        Assert.Equal(CliSupport.ExitUsage, code);
        Assert.Contains("endpoints.json", err, StringComparison.Ordinal);

        // --watch refreshes until interrupted, then exits 0.
        using var watch = new CoordinatorProcess(["status", "--run", runDir, "--watch", "--interval", "0.2"]);
        static int Reports(string text) => text.Split('\n').Count(l => l.StartsWith("step ", StringComparison.Ordinal));
        await Cluster.WaitUntil(() => Reports(watch.Output) >= 3 || watch.Process.HasExited, TimeSpan.FromSeconds(60), "three status reports", () => watch.Output);
        Assert.False(watch.Process.HasExited, watch.Output);
        await ProcessTable.Signal(watch.Process.Id, "INT");
        await watch.Process.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(30));
        Assert.True(watch.Process.ExitCode == 0, watch.Output);
    }

    [Fact(Timeout = 240_000)]
    public async Task MetricsNeedTheClientTokenAndDescribeTheRun()
    {
        var runDir = Path.Combine(Dir, "run");
        using var run = await StartLongRun(runDir);
        var http = new Uri(ReadEndpoints(runDir)["http"]!.GetValue<string>());
        var token = File.ReadAllText(Path.Combine(runDir, "token")).Trim();
        using var client = new HttpClient { BaseAddress = http, Timeout = TimeSpan.FromSeconds(30) };

        using (var refused = await client.GetAsync(new Uri("/metrics", UriKind.Relative)))
        {
            Assert.Equal(HttpStatusCode.Unauthorized, refused.StatusCode);
            Assert.Empty(await refused.Content.ReadAsByteArrayAsync());
        }
        foreach (var wrong in new[] { "not-the-token", token + "x" })
        {
            using var request = new HttpRequestMessage(HttpMethod.Get, "/api/status") { Headers = { Authorization = new AuthenticationHeaderValue("Bearer", wrong) } };
            using var response = await client.SendAsync(request);
            Assert.Equal(HttpStatusCode.Unauthorized, response.StatusCode);
        }
        client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", token);
        var metrics = await client.GetStringAsync(new Uri("/metrics", UriKind.Relative));
        double Value(string name, string labels = "")
        {
            var line = metrics.Split('\n').FirstOrDefault(l => l.StartsWith(name + "{", StringComparison.Ordinal) && l.Contains(labels, StringComparison.Ordinal))
                ?? throw new Xunit.Sdk.XunitException($"no {name}{{{labels}}} in\n{metrics}");
            return double.Parse(line[(line.LastIndexOf(' ') + 1)..], System.Globalization.CultureInfo.InvariantCulture);
        }
        Assert.True(Value("distdiffusion_steps_total") >= 2);
        Assert.Equal(1, Value("distdiffusion_workers_live"));
        Assert.True(Value("distdiffusion_loss") > 0);
        Assert.True(Value("distdiffusion_samples_per_second") > 0);
        Assert.True(Value("distdiffusion_gradient_norm") > 0);
        Assert.True(Value("distdiffusion_step_duration_seconds", "phase=\"compute\"") > 0);
        Assert.True(Value("distdiffusion_step_duration_seconds", "phase=\"update\"") > 0);
        Assert.True(Value("distdiffusion_step_duration_seconds", "phase=\"exchange\"") >= 0);
        Assert.True(Value("distdiffusion_worker_step_duration_seconds") > 0);
        Assert.True(Value("distdiffusion_worker_transferred_bytes_total", "direction=\"out\"") > 0);
        Assert.True(Value("distdiffusion_worker_transferred_bytes_total", "direction=\"in\"") > 0);
        Assert.Equal(0, Value("distdiffusion_sampling_requests"));
        Assert.Contains("# TYPE distdiffusion_steps_total counter", metrics, StringComparison.Ordinal);

        var status = JsonNode.Parse(await client.GetStringAsync(new Uri("/api/status", UriKind.Relative)))!;
        Assert.Equal("swissroll", status["recipe"]!.GetValue<string>());
        Assert.Single(status["workers"]!.AsArray());
        await Cluster.WaitUntil(() => new FileInfo(Path.Combine(runDir, MetricsJournal.FileName)) is { Exists: true, Length: > 0 }, TimeSpan.FromSeconds(60), "metrics.jsonl");
        var history = JsonNode.Parse(await client.GetStringAsync(new Uri("/api/history", UriKind.Relative)))!.AsArray();
        Assert.NotEmpty(history);
        Assert.Equal(0, history[0]!["step"]!.GetValue<long>() % 5);

        // The page itself needs no token; anything else on the port is 404, and POSTs are refused.
        using var anonymous = new HttpClient { BaseAddress = http, Timeout = TimeSpan.FromSeconds(30) };
        var page = await anonymous.GetStringAsync(new Uri("/", UriKind.Relative));
        Assert.Contains("<canvas id=\"lossCurve\"", page, StringComparison.Ordinal);
        Assert.DoesNotContain("http://", page, StringComparison.Ordinal);
        Assert.DoesNotContain("https://", page, StringComparison.Ordinal);
        using (var missing = await client.GetAsync(new Uri("/distdiffusion.v1.Coordination/GetStatus", UriKind.Relative)))
            Assert.Equal(HttpStatusCode.NotFound, missing.StatusCode);
        using var empty = new StringContent("");
        using (var post = await client.PostAsync(new Uri("/metrics", UriKind.Relative), empty))
            Assert.Equal(HttpStatusCode.MethodNotAllowed, post.StatusCode);
    }

    /// <summary>The worker token is not enough for /metrics: only the client (or shared) token is.</summary>
    [Fact(Timeout = 120_000)]
    public async Task MetricsRefuseTheWorkerToken()
    {
        var options = Cluster.Options(Path.Combine(Dir, "serve"), steps: 5);
        options.Http = "http://127.0.0.1:0";
        await using var server = await Cluster.Start(options, new ServerCredentials(null, Cluster.WorkerToken, Cluster.ClientToken));
        using var client = new HttpClient { BaseAddress = server.HttpAddress, Timeout = TimeSpan.FromSeconds(30) };
        foreach (var (token, expected) in new[] { (Cluster.WorkerToken, HttpStatusCode.Unauthorized), (Cluster.ClientToken, HttpStatusCode.OK) })
        {
            using var request = new HttpRequestMessage(HttpMethod.Get, "/metrics") { Headers = { Authorization = new AuthenticationHeaderValue("Bearer", token) } };
            using var response = await client.SendAsync(request);
            Assert.Equal(expected, response.StatusCode);
        }
    }

    /// <summary>Both trainers log a line every --log-every steps; a resumed run appends; loss.png comes with the checkpoints.</summary>
    [Fact(Timeout = 240_000)]
    public async Task BothTrainersAppendTheirHistoryAndDrawTheLoss()
    {
        await Task.Yield();
        var local = Path.Combine(Dir, "local");
        var (code, _, err) = CliHarness.Run(["train", "--recipe", "swissroll", "--seed", "11", "--steps", "10", "--out", local, "--log-every", "2", "--threads", "1", .. Sets(checkpointEvery: 5)]);
        Assert.True(code == 0, err);
        var first = File.ReadAllLines(Path.Combine(local, MetricsJournal.FileName));
        Assert.Equal([2L, 4, 6, 8, 10], MetricsJournal.Read(Path.Combine(local, MetricsJournal.FileName)).Select(r => r.Step));
        Assert.True(File.Exists(Path.Combine(local, MetricsJournal.LossPlotName)));
        (code, _, err) = CliHarness.Run(["train", "--resume", local, "--steps", "14", "--log-every", "2", "--threads", "1"]);
        Assert.True(code == 0, err);
        var after = File.ReadAllLines(Path.Combine(local, MetricsJournal.FileName));
        Assert.Equal(first, after.Take(first.Length));
        var records = MetricsJournal.Read(Path.Combine(local, MetricsJournal.FileName));
        Assert.Equal([2L, 4, 6, 8, 10, 12, 14], records.Select(r => r.Step));
        Assert.All(records, r => Assert.True(r.Loss > 0 && r.GradNorm > 0 && r.LearningRate > 0 && r.SamplesPerSecond > 0, JsonSerializer.Serialize(r)));
        Assert.All(records, r => Assert.Null(r.ComputeSeconds));

        var distributed = Path.Combine(Dir, "distributed");
        (code, _, err) = CliHarness.Run(["run", "--workers", "2", "--worker-threads", "1", "--recipe", "swissroll", "--seed", "11", "--steps", "10", "--out", distributed, "--log-every", "2", .. Sets(checkpointEvery: 5)]);
        Assert.True(code == 0, err);
        var steps = MetricsJournal.Read(Path.Combine(distributed, MetricsJournal.FileName));
        Assert.Equal([2L, 4, 6, 8, 10], steps.Select(r => r.Step));
        Assert.All(steps, r =>
        {
            Assert.True(r.LiveWorkers == 2, JsonSerializer.Serialize(r));
            Assert.True(r.ComputeSeconds > 0 && r.ExchangeSeconds >= 0 && r.UpdateSeconds > 0, JsonSerializer.Serialize(r));
        });
        // The same data order and gradients: the two trainers log the same losses (means over the same steps).
        foreach (var (a, b) in records.Take(5).Zip(steps)) Assert.Equal(a.Loss, b.Loss, 1e-5);
        Assert.True(File.Exists(Path.Combine(distributed, MetricsJournal.LossPlotName)));
    }

    /// <summary>
    /// The distributed trainer honours sample-every: the workers sample pinned weights at steps 4 and 8 and at the end,
    /// and the pictures are those `coordinator train` writes, byte for byte (sample i depends only on the seed and i).
    /// </summary>
    [Fact(Timeout = 240_000)]
    public async Task RunWritesTheSamePeriodicSamplesAsTrain()
    {
        await Task.Yield();
        string[] common = ["--recipe", "swissroll", "--seed", "11", "--steps", "10", .. Sets(), "--set", "sample-every=4"];
        var local = Path.Combine(Dir, "local");
        var distributed = Path.Combine(Dir, "distributed");
        var (code, _, err) = CliHarness.Run(["train", "--out", local, "--threads", "1", .. common]);
        Assert.True(code == 0, err);
        (code, _, err) = CliHarness.Run(["run", "--workers", "2", "--worker-threads", "1", "--out", distributed, .. common]);
        Assert.True(code == 0, err);
        string[] expected = ["step-0000004.png", "step-0000008.png", "step-0000010.png"];
        Assert.Equal(expected, Directory.GetFiles(Path.Combine(distributed, "samples")).Select(Path.GetFileName).Order(StringComparer.Ordinal));
        foreach (var name in expected)
            Assert.True(File.ReadAllBytes(Path.Combine(local, "samples", name)).AsSpan().SequenceEqual(File.ReadAllBytes(Path.Combine(distributed, "samples", name))), $"{name} differs");
    }

    /// <summary>--log-format json: every line of the coordinator and of its workers is one compact JSON event (no prefixes), and --devices reaches the workers.</summary>
    [Fact(Timeout = 180_000)]
    public async Task RunLogsCompactJsonFromEveryProcessAndGivesEachWorkerItsDevice()
    {
        var runDir = Path.Combine(Dir, "run");
        using var run = new CoordinatorProcess(["run", "--workers", "2", "--worker-threads", "1", "--recipe", "swissroll", "--steps", "4", "--out", runDir, "--log-every", "2",
            "--log-format", "json", "--log-level", "information", "--devices", "cpu", .. Sets()]);
        await run.Process.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(120));
        Assert.True(run.Process.ExitCode == 0, run.Output);
        var events = run.Output.Split('\n').Where(l => l.StartsWith('{')).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();
        Assert.DoesNotContain(run.Output.Split('\n'), l => l.StartsWith("[worker", StringComparison.Ordinal) || l.StartsWith("[coordinator]", StringComparison.Ordinal));
        Assert.All(events, e => Assert.True(e.ContainsKey("@t") && e.ContainsKey("@mt"), e.ToJsonString()));
        var steps = events.Where(e => e["@mt"]!.GetValue<string>().StartsWith("Step {Step} of {Target}: loss", StringComparison.Ordinal)).ToList();
        Assert.Equal([2L, 4L], steps.Select(e => e["Step"]!.GetValue<long>()));
        var joined = events.Where(e => e["@mt"]!.GetValue<string>().StartsWith("Joined run {RunId}", StringComparison.Ordinal)).ToList();
        Assert.Equal(2, joined.Count);
        Assert.All(joined, e => Assert.Equal("cpu", e["Device"]!.ToString()));
    }

    [Fact]
    public void DevicesGoToTheWorkersRoundRobin()
    {
        Assert.Equal(["cpu"], RunCommand.WorkerDevices(null, 0));
        Assert.Equal(["cuda:0", "cuda:1"], RunCommand.WorkerDevices(null, 2));
        Assert.Equal(["cuda:1", "cpu", "cuda:0"], RunCommand.WorkerDevices("1, cpu,0", 2));
        Assert.Contains("CUDA is not available", Assert.Throws<ArgumentException>(() => RunCommand.WorkerDevices("0", 0)).Message, StringComparison.Ordinal);
        Assert.Contains("2 are visible", Assert.Throws<ArgumentException>(() => RunCommand.WorkerDevices("2", 2)).Message, StringComparison.Ordinal);
        Assert.Contains("neither a GPU index nor cpu", Assert.Throws<ArgumentException>(() => RunCommand.WorkerDevices("gpu0", 2)).Message, StringComparison.Ordinal);
        Assert.Throws<ArgumentException>(() => RunCommand.WorkerDevices("0,,1", 2));
        // On this machine: a GPU index without CUDA is a usage error before anything starts.
        if (!TorchSharp.torch.cuda.is_available())
        {
            var (code, _, err) = CliHarness.Run(["run", "--workers", "1", "--recipe", "swissroll", "--out", Path.Combine(Dir, "gpu"), "--devices", "0"]);
            Assert.Equal(CliSupport.ExitUsage, code);
            Assert.Contains("CUDA is not available", err, StringComparison.Ordinal);
        }
    }

    /// <summary>With 50051 taken, `run` listens on another port, and endpoints.json says which.</summary>
    [Fact(Timeout = 120_000)]
    public async Task RunFallsBackToAFreePortWhen50051IsTaken()
    {
        await Task.Yield();
        System.Net.Sockets.TcpListener? holder = null;
        if (RunEndpoints.IsFree(RunEndpoints.PreferredGrpcPort))
        {
            holder = new System.Net.Sockets.TcpListener(IPAddress.Loopback, RunEndpoints.PreferredGrpcPort);
            holder.Start();
        }
        try
        {
            Assert.False(RunEndpoints.IsFree(RunEndpoints.PreferredGrpcPort));
            var runDir = Path.Combine(Dir, "run");
            var (code, _, err) = CliHarness.Run(["run", "--workers", "1", "--recipe", "swissroll", "--steps", "2", "--out", runDir, .. Sets()]);
            Assert.True(code == 0, err);
            var grpc = new Uri(ReadEndpoints(runDir)["grpc"]!.GetValue<string>());
            Assert.NotEqual(RunEndpoints.PreferredGrpcPort, grpc.Port);
            Assert.Contains($"coordinator {grpc}", err, StringComparison.Ordinal);
        }
        finally
        {
            holder?.Stop();
            holder?.Dispose();
        }
    }
}
