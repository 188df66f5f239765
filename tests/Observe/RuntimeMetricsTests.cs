using System.Globalization;
using System.Net.Http.Headers;
using DistDiffusion.Tests.Distributed;

namespace DistDiffusion.Tests.Observe;

/// <summary>Issue 30: GET /metrics carries the runtime's and the process's metrics beside the project's.</summary>
[Collection(ClusterCollection.Name)]
public sealed class RuntimeMetricsTests() : TempFolderTest("dd-runtime-metrics")
{
    [Fact(Timeout = 120_000)]
    public async Task MetricsHoldTheRuntimeAndTheProcessBesideTheRun()
    {
        var options = Cluster.Options(Path.Combine(Dir, "serve"), steps: 5);
        options.Http = "http://127.0.0.1:0";
        await using var server = await Cluster.Start(options);
        using var client = new HttpClient { BaseAddress = server.HttpAddress, Timeout = TimeSpan.FromSeconds(30) };
        client.DefaultRequestHeaders.Authorization = new AuthenticationHeaderValue("Bearer", Cluster.Token);
        GC.Collect();
        var metrics = await client.GetStringAsync(new Uri("/metrics", UriKind.Relative));
        var lines = metrics.Split('\n');
        double Value(string name)
        {
            var line = lines.FirstOrDefault(l => l.StartsWith(name + "{", StringComparison.Ordinal) || l.StartsWith(name + " ", StringComparison.Ordinal))
                ?? throw new Xunit.Sdk.XunitException($"no {name} in\n{metrics}");
            return double.Parse(line[(line.LastIndexOf(' ') + 1)..], CultureInfo.InvariantCulture);
        }
        // The project's own, as before.
        Assert.Equal(0, Value("distdiffusion_steps_total"));
        Assert.Contains("# TYPE distdiffusion_steps_total counter", metrics, StringComparison.Ordinal);
        // The process's: CPU time spent and memory in use by this (test) process.
        Assert.True(Value("process_cpu_time_seconds_total") > 0);
        Assert.InRange(Value("process_memory_usage_bytes"), 1 << 20, 1L << 40);
        Assert.True(Value("process_thread_count") >= 1);
        // The runtime's: collections (one was just forced), heap allocations, JIT-compiled methods.
        var collections = lines.Where(l => l.StartsWith("dotnet_gc_collections_total{", StringComparison.Ordinal)).ToList();
        Assert.NotEmpty(collections);
        Assert.True(collections.Sum(l => double.Parse(l[(l.LastIndexOf(' ') + 1)..], CultureInfo.InvariantCulture)) >= 1, metrics);
        Assert.True(Value("dotnet_gc_heap_total_allocated_bytes_total") > 0);
        Assert.True(Value("dotnet_jit_compiled_methods_total") > 0);
    }
}
