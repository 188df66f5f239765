using DistDiffusion.Model.Optimization;
using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Training;

/// <summary>
/// A network's parameters (or their gradients) as one flat float32 vector in named_parameters order:
/// how the coordinator and the workers exchange them. Copies are whole-tensor memcpys, never per element.
/// </summary>
public sealed class ParameterVector
{
    private readonly (string Name, Tensor Parameter, long Offset, long Count)[] _layout;

    /// <summary>Over parameters, or any same-shaped tensors such as the EMA weights.</summary>
    public ParameterVector(IEnumerable<(string Name, Tensor Parameter)> parameters)
    {
        var layout = new List<(string, Tensor, long, long)>();
        long offset = 0;
        foreach (var (name, p) in parameters)
        {
            if (p.dtype != ScalarType.Float32)
                throw new ArgumentException($"parameter '{name}' is {p.dtype}; only float32 parameters can be exchanged");
            layout.Add((name, p, offset, p.numel()));
            offset += p.numel();
        }
        _layout = [.. layout];
        Elements = offset;
    }

    public static ParameterVector Of(TorchSharp.torch.nn.Module module) =>
        new(module.named_parameters().Select(p => (p.name, (Tensor)p.parameter)));

    public long Elements { get; }
    public int Count => _layout.Length;
    public IEnumerable<(string Name, long[] Shape)> Shapes => _layout.Select(l => (l.Name, l.Parameter.shape));

    /// <summary>The parameters' values as little-endian float32 bytes [Elements * 4].</summary>
    public byte[] ReadValues()
    {
        var bytes = new byte[Elements * 4];
        ReadValues(bytes);
        return bytes;
    }

    /// <summary>The parameters' values written into <paramref name="bytes"/> [Elements * 4] (a reused buffer).</summary>
    public void ReadValues(Span<byte> bytes)
    {
        if (bytes.Length != Elements * 4)
            throw new ArgumentException($"value buffer of {bytes.Length} bytes, expected {Elements * 4}");
        foreach (var (_, p, offset, count) in _layout)
            CopyOut(p, bytes.Slice((int)(offset * 4), (int)(count * 4)));
    }

    /// <summary>Overwrites the parameters with <paramref name="values"/> [Elements].</summary>
    public void WriteValues(ReadOnlySpan<float> values)
    {
        CheckLength(values.Length);
        using var noGrad = no_grad();
        foreach (var (_, p, offset, count) in _layout)
            CopyIn(p, MemoryMarshal.AsBytes(values.Slice((int)offset, (int)count)));
    }

    /// <summary>
    /// The current gradients as little-endian float32 bytes [Elements * 4] (zeros where a parameter has none) and a
    /// bitmap of which parameters have one (bit i of byte i/8).
    /// </summary>
    public (byte[] Values, byte[] Present) ReadGradients()
    {
        var values = new byte[Elements * 4];
        return (values, ReadGradients(values));
    }

    /// <summary>The current gradients written into <paramref name="values"/> [Elements * 4] (e.g. a shared-memory region); returns the presence bitmap.</summary>
    public byte[] ReadGradients(Span<byte> values)
    {
        if (values.Length != Elements * 4)
            throw new ArgumentException($"gradient buffer of {values.Length} bytes, expected {Elements * 4}");
        var present = new byte[(_layout.Length + 7) / 8];
        using var scope = NewDisposeScope();
        for (var i = 0; i < _layout.Length; i++)
        {
            var (_, p, offset, count) = _layout[i];
            var destination = values.Slice((int)(offset * 4), (int)(count * 4));
            if (p.grad is not { } g)
            {
                destination.Clear();
                continue;
            }
            present[i / 8] |= (byte)(1 << (i % 8));
            CopyOut(g, destination);
        }
        return present;
    }

    /// <summary>
    /// Sets the gradients to <paramref name="values"/> [Elements] for the parameters marked in <paramref name="present"/>;
    /// the others keep the gradient they have (zeroed after each step, or none), exactly as after a local backward pass.
    /// </summary>
    public void WriteGradients(ReadOnlySpan<float> values, ReadOnlySpan<byte> present)
    {
        CheckLength(values.Length);
        using var scope = NewDisposeScope();
        using var noGrad = no_grad();
        for (var i = 0; i < _layout.Length; i++)
        {
            if (!VectorMath.IsPresent(present, i)) continue;
            var (_, p, offset, count) = _layout[i];
            var slice = MemoryMarshal.AsBytes(values.Slice((int)offset, (int)count));
            if (p.grad is { } g)
                CopyIn(g, slice);
            else
            {
                // The parameter keeps the native tensor; the scope releases only this wrapper (a detached one would stay
                // counted until finalized: one per parameter per step once micro-batches clear the grads).
                var fresh = zeros_like(p);
                CopyIn(fresh, slice);
                p.grad = fresh;
            }
        }
    }

    private void CheckLength(int length)
    {
        if (length != Elements)
            throw new ArgumentException($"vector has {length} elements, expected {Elements}");
    }

    private static void CopyOut(Tensor t, Span<byte> destination)
    {
        using var cpu = t.device_type == DeviceType.CPU ? t.contiguous() : t.cpu().contiguous();
        cpu.bytes.CopyTo(destination);
    }

    private static void CopyIn(Tensor t, ReadOnlySpan<byte> source)
    {
        if (t.device_type == DeviceType.CPU && t.is_contiguous())
        {
            source.CopyTo(t.bytes);
            return;
        }
        using var staging = empty(t.shape, ScalarType.Float32);
        source.CopyTo(staging.bytes);
        t.copy_(staging);
    }
}
