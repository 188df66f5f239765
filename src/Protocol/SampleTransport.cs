using DistDiffusion.Protocol.V1;
using Google.Protobuf;

namespace DistDiffusion.Protocol;

/// <summary>
/// A finished sampling batch on the worker's stream. A batch whose samples and trajectory frames fit
/// <see cref="InlineBytes"/> goes as one <see cref="SampleOutput"/>; a larger one (a long trajectory: 401 frames of a
/// 28x28 image are 1.26 MB) goes as a SampleOutput whose <c>payload</c> header describes the bytes — samples, then
/// each frame, float32 — followed by <see cref="SampleOutputChunk"/>s of at most <see cref="TensorTransport.ChunkBytes"/>,
/// so no message passes the coordinator's 1 MiB + 64 KiB limit whatever the trajectory.
/// </summary>
public static class SampleTransport
{
    /// <summary>Most payload bytes one SampleOutput carries inline (the rest of the message is a few dozen bytes).</summary>
    public const int InlineBytes = 900 * 1024;

    /// <summary>
    /// The messages of one finished batch: <paramref name="head"/> (job, batch, first index, count; no bytes yet) with
    /// the bytes inline, or as header + chunks. The chunks wrap a buffer of their own, so the arrays may be reused after.
    /// </summary>
    public static IEnumerable<WorkerMessage> Output(SampleOutput head, ReadOnlyMemory<byte> samples, IReadOnlyList<ReadOnlyMemory<byte>> frames)
    {
        var total = samples.Length + frames.Sum(f => (long)f.Length);
        if (total <= InlineBytes)
        {
            head.Samples = ByteString.CopyFrom(samples.Span);
            foreach (var f in frames) head.Trajectory.Add(ByteString.CopyFrom(f.Span));
            yield return new WorkerMessage { SampleOutput = head };
            yield break;
        }
        if (total > int.MaxValue || total % 4 != 0)
            throw new ArgumentException($"a sample batch of {total} bytes: expected float32 values and at most {int.MaxValue} bytes");
        var payload = new byte[total];
        samples.Span.CopyTo(payload);
        var offset = samples.Length;
        foreach (var f in frames)
        {
            f.Span.CopyTo(payload.AsSpan(offset));
            offset += f.Length;
        }
        head.Payload = TensorTransport.Header(payload, DType.Float32, total / 4, 0, 0);
        yield return new WorkerMessage { SampleOutput = head };
        foreach (var chunk in TensorTransport.Chunks(payload, 0, 0))
            yield return new WorkerMessage { SampleOutputChunk = new SampleOutputChunk { JobId = head.JobId, Batch = head.Batch, Chunk = chunk } };
    }
}
