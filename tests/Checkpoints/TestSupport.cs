using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Checkpoints;

internal static class TensorAssert
{
    /// <summary>Same dtype, same shape and bit-identical contents.</summary>
    public static void BitEqual(Tensor expected, Tensor actual, string what)
    {
        Assert.True(expected.dtype == actual.dtype, $"{what}: dtype {actual.dtype}, expected {expected.dtype}");
        Assert.True(expected.shape.SequenceEqual(actual.shape),
            $"{what}: shape [{string.Join(",", actual.shape)}], expected [{string.Join(",", expected.shape)}]");
        Assert.Equal(DeviceType.CPU, actual.device_type);
        using var e = expected.detach().cpu().contiguous();
        using var a = actual.detach().cpu().contiguous();
        if (e.numel() == 0) return;
        Assert.True(e.bytes.SequenceEqual(a.bytes), $"{what}: contents differ");
    }

    public static void BitEqual(IReadOnlyDictionary<string, Tensor> expected, IReadOnlyDictionary<string, Tensor> actual, string what)
    {
        Assert.Equal(expected.Keys.OrderBy(k => k, StringComparer.Ordinal), actual.Keys.OrderBy(k => k, StringComparer.Ordinal));
        foreach (var (name, tensor) in expected)
            BitEqual(tensor, actual[name], $"{what}[{name}]");
    }

    public static void DisposeAll(IEnumerable<Tensor> tensors)
    {
        foreach (var t in tensors) t.Dispose();
    }
}
