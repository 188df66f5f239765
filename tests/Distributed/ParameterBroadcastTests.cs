using DistDiffusion.Coordinator.Training;
using DistDiffusion.Coordinator.Workers;
using DistDiffusion.Model.Training;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Distributed;

/// <summary>How the parameters reach a worker with a shared-memory region, without processes.</summary>
public sealed class ParameterBroadcastTests
{
    private static List<CoordinatorMessage> Drain(WorkerConnection w)
    {
        var sent = new List<CoordinatorMessage>();
        while (w.Outbox.TryRead(out var m)) sent.Add(m);
        return sent;
    }

    [SharedMemoryFact]
    public void ARegionTheWorkerMayNotHaveReadIsLeftAloneAndTheParametersGoOnTheStream()
    {
        using var weights = arange(0, 1000, dtype: ScalarType.Float32).reshape(10, 100);
        var vector = new ParameterVector([("w", weights)]);
        var broadcast = new ParameterBroadcast(vector, ema: null);
        using var segment = SharedTensorSegment.TryCreate(vector.Elements * 4, out var reason) ?? throw new InvalidOperationException(reason);
        var worker = new WorkerConnection(new Join { Host = "h", Device = "cpu", Threads = 1, ProtocolVersion = Names.ProtocolVersion }, "test") { SharedMemory = segment };

        // Version 1 through the region: header with SharedMemory set, no chunks, the bytes in the region.
        broadcast.Publish(1, 1);
        broadcast.SendTo(worker, regionRead: true);
        var first = Drain(worker);
        Assert.Single(first);
        Assert.True(first[0].Parameters.SharedMemory);
        Assert.Equal(0UL, first[0].Parameters.Checksum);
        Assert.Equal(segment.SequenceOf(SharedRegion.Parameters), first[0].Parameters.SharedSequence);
        var regionAtVersion1 = segment[SharedRegion.Parameters][..(int)(vector.Elements * 4)].ToArray();
        Assert.Equal(Enumerable.Range(0, 1000).Select(i => (float)i), System.Runtime.InteropServices.MemoryMarshal.Cast<byte, float>(regionAtVersion1).ToArray());

        // Version 2 while the worker may still be before version 1's header: the region keeps version 1's write (what that
        // header's sequence describes) and version 2 arrives as header + chunks, with the checksum of its bytes.
        using (no_grad()) weights.add_(1);
        broadcast.Publish(2, 2);
        broadcast.SendTo(worker, regionRead: false);
        var second = Drain(worker);
        Assert.False(second[0].Parameters.SharedMemory);
        Assert.Equal(2UL, second[0].Parameters.ParameterVersion);
        Assert.True(second[0].Parameters.ChunkCount >= 1);
        Assert.Equal((int)second[0].Parameters.ChunkCount, second.Count(m => m.KindCase == CoordinatorMessage.KindOneofCase.ParametersChunk));
        Assert.Equal(regionAtVersion1, segment[SharedRegion.Parameters][..(int)(vector.Elements * 4)].ToArray());
        Assert.Equal(first[0].Parameters.SharedSequence, segment.SequenceOf(SharedRegion.Parameters));
        var chunks = second.Where(m => m.KindCase == CoordinatorMessage.KindOneofCase.ParametersChunk).SelectMany(m => m.ParametersChunk.Data.ToByteArray()).ToArray();
        Assert.Equal(second[0].Parameters.Checksum, TensorTransport.Checksum(chunks));
        Assert.Equal(2UL, worker.Schedule.ParameterVersion);
    }
}
