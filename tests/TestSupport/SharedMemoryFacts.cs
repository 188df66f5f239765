using DistDiffusion.Protocol;

namespace DistDiffusion.Tests;

/// <summary>Why a shared-memory test does not run here: this machine has no /dev/shm (the stream is the only path), else null.</summary>
internal static class SharedMemorySupport
{
    public static string? Missing => SharedTensorSegment.Supported && OperatingSystem.IsLinux()
        ? null
        : $"no {SharedTensorSegment.Folder} on this machine: workers exchange tensors on the stream only";
}

/// <summary>A fact about the shared-memory path: reported as skipped, not passed, where the machine has none.</summary>
public sealed class SharedMemoryFactAttribute : FactAttribute
{
    public SharedMemoryFactAttribute()
    {
        if (SharedMemorySupport.Missing is { } why) Skip = why;
    }
}

/// <summary>A theory about the shared-memory path: reported as skipped, not passed, where the machine has none.</summary>
public sealed class SharedMemoryTheoryAttribute : TheoryAttribute
{
    public SharedMemoryTheoryAttribute()
    {
        if (SharedMemorySupport.Missing is { } why) Skip = why;
    }
}
