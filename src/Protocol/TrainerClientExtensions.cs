using Grpc.Core;

namespace DistDiffusion.Protocol.V1;

public static partial class Trainer
{
    [System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1034", Justification = "The generated client is nested; this adds to it (the protected CallInvoker is reachable only from inside).")]
    public partial class TrainerClient
    {
        /// <summary>
        /// Connect, with parameter chunks received into pooled arrays (<see cref="TensorMessages"/>): give each message back
        /// with <see cref="TensorMessages.Release(CoordinatorMessage)"/> once its bytes are copied out.
        /// </summary>
        public virtual AsyncDuplexStreamingCall<WorkerMessage, CoordinatorMessage> ConnectPooled(Metadata? headers = null, DateTime? deadline = null, CancellationToken cancellationToken = default) =>
            CallInvoker.AsyncDuplexStreamingCall(TensorMessages.Connect, null, new CallOptions(headers, deadline, cancellationToken));
    }
}
