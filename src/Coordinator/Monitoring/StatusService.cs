using DistDiffusion.Coordinator.Training;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Google.Protobuf;
using Grpc.Core;

namespace DistDiffusion.Coordinator.Monitoring;

/// <summary>The client-facing Coordinator service: run and worker status.</summary>
public sealed class StatusService(TrainingLoop loop) : Coordination.CoordinationBase
{
    /// <summary>The largest status reply: what clients accept (<see cref="ClientChannel.MaxReceiveMessageBytes"/>), less room for framing.</summary>
    public const int MaxReplyBytes = ClientChannel.MaxReceiveMessageBytes - 64 * 1024;

    public override Task<StatusReply> GetStatus(GetStatusRequest request, ServerCallContext context) => Task.FromResult(Fit(loop.Status(), MaxReplyBytes));

    /// <summary>
    /// <paramref name="reply"/> with as many workers as fit in <paramref name="maxBytes"/>: connected workers first, then
    /// departed ones, most recently seen first; the rest are counted in <see cref="StatusReply.WorkersOmitted"/>. Those
    /// listed keep their order.
    /// </summary>
    public static StatusReply Fit(StatusReply reply, int maxBytes)
    {
        if (reply.CalculateSize() <= maxBytes) return reply;
        var all = reply.Workers.ToList();
        reply.Workers.Clear();
        reply.WorkersOmitted = uint.MaxValue;   // the field's largest encoding, so the count fits whatever it becomes
        var size = reply.CalculateSize();
        var keep = new HashSet<WorkerStatus>(ReferenceEqualityComparer.Instance);
        foreach (var w in all.OrderBy(w => w.State is WorkerState.Dropped or WorkerState.Left ? 1 : 0).ThenBy(w => w.LastSeenSecondsAgo))
        {
            var bytes = 1 + CodedOutputStream.ComputeMessageSize(w);
            if (size + bytes > maxBytes) break;
            size += bytes;
            keep.Add(w);
        }
        reply.Workers.AddRange(all.Where(keep.Contains));
        reply.WorkersOmitted = (uint)(all.Count - keep.Count);
        return reply;
    }
}
