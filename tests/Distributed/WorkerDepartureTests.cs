using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;

namespace DistDiffusion.Tests.Distributed;

/// <summary>
/// A worker that says Leave shows as left in the status, with the reason it gave; one whose stream just ends shows as
/// dropped. (The roster used to compare the reason with "left" while the handler passed "left: REASON", so every
/// departure showed as dropped.) On both ways a worker's stream travels.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class WorkerDepartureTests() : TempFolderTest("dd-departure")
{
    [Theory(Timeout = 60_000)]
    [InlineData(TrainerTransport.Grpc)]
    [InlineData(TrainerTransport.Socket)]
    public async Task AWorkerThatLeavesShowsAsLeftAndOneThatVanishesAsDropped(TrainerTransport transport)
    {
        await using var server = await Cluster.Start(Cluster.Options(Path.Combine(Dir, "run"), steps: 1000));
        string leaving, vanishing;
        await using (var w = await RawWorker.JoinAsync(server.Address, transport: transport))
        {
            leaving = w.Welcome.WorkerId;
            await w.SendAsync(new WorkerMessage { Leave = new Leave { WorkerId = leaving, Reason = "node drained" } });
            await Cluster.WaitUntil(() => StateOf(server, leaving) == WorkerState.Left, TimeSpan.FromSeconds(20), $"worker {leaving} to show as left",
                () => $"state {StateOf(server, leaving)}");
        }
        await using (var w = await RawWorker.JoinAsync(server.Address, transport: transport))
            vanishing = w.Welcome.WorkerId;   // the stream ends without a Leave
        await Cluster.WaitUntil(() => StateOf(server, vanishing) == WorkerState.Dropped, TimeSpan.FromSeconds(20), $"worker {vanishing} to show as dropped",
            () => $"state {StateOf(server, vanishing)}");
        Assert.Equal(WorkerState.Left, StateOf(server, leaving));
    }

    private static WorkerState? StateOf(Coordinator.Hosting.CoordinatorServer server, string id) =>
        server.Loop.Status().Workers.FirstOrDefault(w => w.Id == id)?.State;
}
