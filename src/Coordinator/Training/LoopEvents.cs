using DistDiffusion.Coordinator.Sampling;
using DistDiffusion.Coordinator.Workers;
using DistDiffusion.Protocol.V1;

namespace DistDiffusion.Coordinator.Training;

/// <summary>
/// A finished slice gradient, decoded and checksum-verified by the stream handler, with its sum of squares in double
/// (non-finite when an element is) for the loop's <see cref="SliceGuard"/>, and the checksum of its bytes as sent (null
/// when they came through shared memory, which is checked by its write sequence: the loop hashes its copy when a
/// comparison needs one).
/// </summary>
internal sealed record SliceGradient(WorkerConnection Worker, ulong Step, uint Slice, float[] Values, byte[] Present, double Loss, double ComputeSeconds, double SumOfSquares, ulong? Checksum);

/// <summary>What the stream handlers tell the loop.</summary>
internal abstract record LoopEvent;
internal sealed record WorkerJoined(WorkerConnection Worker) : LoopEvent;
/// <summary>A worker's stream ended: it said Leave (<see cref="WorkerState.Left"/>) or it failed or was refused (<see cref="WorkerState.Dropped"/>).</summary>
internal sealed record WorkerGone(WorkerConnection Worker, WorkerState Departure, string Reason) : LoopEvent;
internal sealed record GradientArrived(SliceGradient Gradient) : LoopEvent;

/// <summary>A request from the sampling side for the current weights (served by the loop, which owns them).</summary>
internal sealed record WeightsRequested(bool PreferEma, TaskCompletionSource<WeightsSnapshot> Reply) : LoopEvent;

/// <summary>The step in progress as the stream handlers see it (immutable; replaced as slices move).</summary>
internal sealed record StepSnapshot(ulong Step, ulong Version, int[] SliceSizes, string[][] Holders, bool[] Done)
{
    /// <summary><see cref="StepRound.Judge"/> on this snapshot, for a push of <paramref name="workerId"/>.</summary>
    public SliceRejection Judge(ulong step, uint slice, string workerId) =>
        StepRound.Judge(Step, Holders.Length, step, slice, k => Done[k], k => Holders[k].Contains(workerId));
}

/// <summary>A push the stream handler ignored (already in, or for a finished step): the loop compares its checksum.</summary>
internal sealed record DuplicateSeen(WorkerConnection Worker, ulong Step, uint Slice, ulong? Checksum) : LoopEvent;
