namespace DistDiffusion.Tests.Distributed;

/// <summary>The coordinator server's own lifetime, apart from training.</summary>
[Collection(ClusterCollection.Name)]
public sealed class CoordinatorServerTests() : TempFolderTest("dd-server")
{
    [Fact(Timeout = 60_000)]
    public async Task StoppedIsOneWaitHoweverOftenItIsReadAndEndsWithTheServer()
    {
        // `run` polls Stopped every 250 ms for the whole run: a new wait per read kept a registration and a task alive
        // each time (~8 a second; 956 more objects of each kind after 2 minutes in a heap dump).
        await using var server = await Cluster.Start(Cluster.Options(Path.Combine(Dir, "run"), steps: 10));
        var stopped = server.Stopped;
        for (var i = 0; i < 100; i++) Assert.Same(stopped, server.Stopped);
        Assert.False(stopped.IsCompleted);
        await server.StopAsync();
        await stopped.WaitAsync(TimeSpan.FromSeconds(30));
    }
}
