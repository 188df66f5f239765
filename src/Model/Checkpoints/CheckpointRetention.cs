using System.Globalization;

namespace DistDiffusion.Model.Checkpoints;

/// <summary>
/// Which checkpoints of a run are kept after a new one is written and verified: the <see cref="KeepLast"/> highest
/// steps, and, when <see cref="KeepEvery"/> is set, every checkpoint whose step is a multiple of it (kept for good).
/// The checkpoint just written is always kept.
/// </summary>
public sealed record CheckpointRetention
{
    /// <summary>Checkpoints kept by default: cifar10-ddpm writes ~570 MB per checkpoint, so 5 fit a 20 Gi volume with room.</summary>
    public const int DefaultKeepLast = 5;

    /// <param name="keepLast">How many of the newest checkpoints to keep (>= 1; the CLI's --keep-checkpoints).</param>
    /// <param name="keepEvery">Also keep every checkpoint whose step is a multiple of this (>= 1; null: none; the CLI's --keep-every).</param>
    /// <exception cref="ArgumentException">a count or interval below 1, naming the flag and the value.</exception>
    public CheckpointRetention(int keepLast = DefaultKeepLast, int? keepEvery = null)
    {
        if (keepLast < 1)
            throw new ArgumentException($"--keep-checkpoints {keepLast.ToString(CultureInfo.InvariantCulture)}: expected a count >= 1 (the newest checkpoint is always kept)");
        if (keepEvery is < 1)
            throw new ArgumentException($"--keep-every {keepEvery.Value.ToString(CultureInfo.InvariantCulture)}: expected a step interval >= 1 (leave it out to keep only the last checkpoints)");
        KeepLast = keepLast;
        KeepEvery = keepEvery;
    }

    public int KeepLast { get; }
    public int? KeepEvery { get; }

    public static CheckpointRetention Default { get; } = new();

    /// <summary>Whether a step is kept for good because of <see cref="KeepEvery"/>.</summary>
    public bool KeepsForGood(long step) => KeepEvery is { } k && step % k == 0;

    public override string ToString() => string.Create(CultureInfo.InvariantCulture,
        $"keep the last {KeepLast}{(KeepEvery is { } k ? $" and every step that is a multiple of {k}" : "")}");
}
