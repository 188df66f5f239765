namespace DistDiffusion.Model.Checkpoints;

/// <summary>A step's folder that was in the way of a save and not a valid checkpoint: where it went and why.</summary>
public sealed record SetAsideFolder(string Folder, string MovedTo, string Reason);

/// <summary>What <see cref="CheckpointStore.Write"/> did: the verified checkpoint, what it moved aside and what retention deleted.</summary>
/// <param name="PruneProblems">Checkpoints retention could not delete, with the error (they stay; the save succeeded).</param>
public sealed record SavedCheckpoint(string Folder, long Step, IReadOnlyList<SetAsideFolder> SetAside, IReadOnlyList<string> Deleted, IReadOnlyList<string> PruneProblems);
