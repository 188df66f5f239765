using DistDiffusion.Protocol.V1;
using Grpc.Core;

namespace DistDiffusion.Protocol;

/// <summary>
/// The generated Trainer client, plus Connect with <see cref="TensorMessages"/>' marshallers: parameter chunks arrive in
/// pooled arrays, to be given back with <see cref="TensorMessages.Release(CoordinatorMessage)"/> once copied out. A subclass
/// because the call invoker is protected (and code in the generated namespace must not reach back into this one).
/// </summary>
public sealed class PooledTrainerClient : Trainer.TrainerClient
{
    public PooledTrainerClient(ChannelBase channel) : base(channel)
    {
    }

    public AsyncDuplexStreamingCall<WorkerMessage, CoordinatorMessage> ConnectPooled(Metadata? headers = null, DateTime? deadline = null, CancellationToken cancellationToken = default) =>
        CallInvoker.AsyncDuplexStreamingCall(TensorMessages.Connect, null, new CallOptions(headers, deadline, cancellationToken));
}
