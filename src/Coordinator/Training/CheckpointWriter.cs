using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Observe;
using DistDiffusion.Model.Checkpoints;
using Microsoft.Extensions.Logging;

namespace DistDiffusion.Coordinator.Training;

/// <summary>
/// The loop's checkpoints: the state of the last completed step written and verified by <see cref="CheckpointStore.Write"/>,
/// the retention applied, the loss plot redrawn beside it, the run status told. The loop calls it between steps only
/// (never while an update is half-applied), so every checkpoint is one step's state.
/// </summary>
internal sealed class CheckpointWriter(RunSetup run, RunStatus status, MetricsJournal journal, ILogger log)
{
    /// <summary>
    /// Writes and verifies a checkpoint of the current step, then applies the retention. A checkpoint the disk refuses
    /// (full, I/O error) is logged and training goes on; the next interval tries again. The status fields move only on success.
    /// </summary>
    public bool Save()
    {
        var step = run.State.StepsDone;
        SavedCheckpoint saved;
        try
        {
            using var guard = Model.TorchRuntime.Compute();
            saved = CheckpointStore.Write(run.RunDir, run.State.ToCheckpoint(), run.Retention);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            var (last, lastStep) = status.LastCheckpoint;
            log.LogError(e, "Checkpoint of step {Step} not written; training goes on and the next checkpoint tries again (last checkpoint {LastCheckpoint}, step {LastStep})",
                step, last.Length > 0 ? last : "none", lastStep);
            return false;
        }
        status.CheckpointSaved(saved.Folder, saved.Step);
        try
        {
            journal.WriteLossPlot(run.State.Recipe.Name);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            log.LogWarning(e, "Could not write {Path}", journal.LossPlotPath);
        }
        foreach (var aside in saved.SetAside)
            log.LogWarning("{Folder} was not a valid checkpoint ({Reason}); moved it to {MovedTo}", aside.Folder, aside.Reason, aside.MovedTo);
        log.LogInformation("Checkpoint {Folder}", saved.Folder);
        foreach (var gone in saved.Deleted)
            log.LogInformation("Deleted checkpoint {Folder} (retention: {Retention})", gone, run.Retention);
        foreach (var problem in saved.PruneProblems)
            log.LogWarning("Could not delete an old checkpoint: {Problem}", problem);
        return true;
    }

    /// <summary>The checkpoint at the end of training, tried 3 times (1 s, then 2 s apart); then an IOException fails the run.</summary>
    public async Task SaveFinalAsync(CancellationToken ct)
    {
        const int attempts = 3;
        var pause = TimeSpan.FromSeconds(1);
        for (var attempt = 1; attempt <= attempts; attempt++)
        {
            if (Save()) return;
            if (attempt == attempts) break;
            await Task.Delay(pause, ct);
            pause *= 2;
        }
        throw new IOException($"the final checkpoint of step {run.State.StepsDone} could not be written in {attempts} attempts; the last checkpoint is {status.DescribeLastCheckpoint()}");
    }
}
