using System.Collections.Concurrent;

namespace DistDiffusion.Protocol;

/// <summary>
/// Reusable float32 buffers of one exact length (a network's parameter count): the gradients a coordinator receives
/// and the parameters a worker receives are tensor-sized, every step, and would otherwise be fresh allocations that the
/// GC must zero and collect. Rent on arrival, return once the values are consumed; a buffer that is never returned is
/// simply collected. At most <see cref="Capacity"/> idle buffers are kept.
/// </summary>
public sealed class TensorBufferPool
{
    public const int Capacity = 8;
    private readonly ConcurrentBag<float[]> _idle = [];
    private long _allocated;

    public TensorBufferPool(long elements)
    {
        if (elements <= 0 || elements > Array.MaxLength) throw new ArgumentOutOfRangeException(nameof(elements), elements, "expected 1..Array.MaxLength elements");
        Elements = elements;
    }

    public long Elements { get; }

    /// <summary>Buffers created so far (a pool that works stops growing after the first steps).</summary>
    public long Allocated => Interlocked.Read(ref _allocated);

    /// <summary>A buffer of <see cref="Elements"/> floats with arbitrary contents.</summary>
    public float[] Rent()
    {
        if (_idle.TryTake(out var buffer)) return buffer;
        Interlocked.Increment(ref _allocated);
        return GC.AllocateUninitializedArray<float>((int)Elements);
    }

    public void Return(float[] buffer)
    {
        if (buffer.Length != Elements) throw new ArgumentException($"buffer of {buffer.Length} floats returned to a pool of {Elements}");
        if (_idle.Count < Capacity) _idle.Add(buffer);
    }
}
