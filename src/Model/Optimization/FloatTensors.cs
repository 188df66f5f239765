using System.Runtime.InteropServices;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Model.Optimization;

/// <summary>The element loops' view of a tensor: its float32 values in place, where the tensor allows it.</summary>
internal static class FloatTensors
{
    /// <summary>Whether <see cref="Values"/> applies: a contiguous float32 tensor in CPU memory.</summary>
    public static bool InPlace(Tensor t) => t.device_type == DeviceType.CPU && t.dtype == ScalarType.Float32 && t.is_contiguous();

    /// <summary>The tensor's memory as float32 values [numel] (only where <see cref="InPlace"/>); writes change the tensor.</summary>
    public static Span<float> Values(Tensor t) => MemoryMarshal.Cast<byte, float>(t.bytes);
}
