namespace DistDiffusion.Coordinator.Workers;

/// <summary>
/// What the training loop keeps about one worker between and within steps. Only the loop's thread reads or writes it
/// (the roster, the step driver and the parameter broadcast all run on it).
/// </summary>
internal sealed class WorkerSchedule
{
    /// <summary>Parameter version this worker was last sent (null: none).</summary>
    public ulong? ParameterVersion { get; set; }
    /// <summary>Assignments (step, slice) this worker has not answered yet.</summary>
    public HashSet<(ulong Step, uint Slice)> Outstanding { get; } = [];
    /// <summary>A backup took over a slice of this worker's that was slow; it gets no new slices until it answers.</summary>
    public bool Straggling { get; set; }
    /// <summary>Times in a row a backup had to take over a slice of this worker's.</summary>
    public int Straggles { get; set; }
    /// <summary>The first step this worker gets slices again after straggling: 2^Straggles steps later (at most 256).</summary>
    public ulong SitOutUntilStep { get; set; }
}
