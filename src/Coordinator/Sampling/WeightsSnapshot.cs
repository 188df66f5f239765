using DistDiffusion.Protocol.V1;

namespace DistDiffusion.Coordinator.Sampling;

/// <summary>One consistent set of weights to sample with: id (cache key on workers), parameter version, EMA or raw, float32 bytes.</summary>
public sealed record WeightsSnapshot(ulong Id, ulong Version, bool Ema, byte[] Bytes, TensorHeader Header);

