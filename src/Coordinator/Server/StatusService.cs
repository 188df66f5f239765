using DistDiffusion.Protocol.V1;
using Grpc.Core;

namespace DistDiffusion.Coordinator.Server;

/// <summary>The client-facing Coordinator service: run and worker status.</summary>
public sealed class StatusService(TrainingLoop loop) : DistDiffusion.Protocol.V1.Coordinator.CoordinatorBase
{
    public override Task<StatusReply> GetStatus(GetStatusRequest request, ServerCallContext context) => Task.FromResult(loop.Status());
}
