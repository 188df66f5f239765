using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;

namespace DistDiffusion.Coordinator.Workers;

/// <summary>
/// What the handler of one worker's stream keeps between that worker's messages. Only the handler reads or writes it: a
/// stream is read by one flow at a time, from the Join to the handler's end (which disposes what is left).
/// </summary>
internal sealed class WorkerInbox
{
    /// <summary>Gradient being received: its header and assembler; the slice it answers.</summary>
    public (GradientHeader Header, TensorAssembler Assembler)? Incoming { get; set; }
    /// <summary>The shared-memory segment offered in the Welcome, until the worker answers.</summary>
    public SharedTensorSegment? OfferedSegment { get; set; }
    /// <summary>A push being ignored (stale or duplicate): its chunks are skipped.</summary>
    public (ulong Step, uint Slice)? Ignoring { get; set; }
}
