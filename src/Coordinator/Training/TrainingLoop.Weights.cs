using DistDiffusion.Coordinator.Sampling;

namespace DistDiffusion.Coordinator.Training;

/// <summary>Weights snapshots: the current weights for a sampling request and for the periodic sample pictures, taken between steps on the loop.</summary>
public sealed partial class TrainingLoop
{
    /// <summary>The current weights (EMA when preferred and kept), read by the loop between steps.</summary>
    public Task<WeightsSnapshot> SnapshotAsync(bool preferEma, CancellationToken ct)
    {
        var reply = new TaskCompletionSource<WeightsSnapshot>(TaskCreationOptions.RunContinuationsAsynchronously);
        Post(new WeightsRequested(preferEma, reply));
        return reply.Task.WaitAsync(ct);
    }

    private void Serve(WeightsRequested request)
    {
        try
        {
            WeightsSnapshot snapshot;
            using (Model.TorchRuntime.Compute())
            {
                _run.State.FlushEma();
                snapshot = _parameters.Snapshot(request.PreferEma, (ulong)_run.State.StepsDone);
            }
            request.Reply.TrySetResult(snapshot);
        }
#pragma warning disable CA1031 // the failure is handed to the waiting requester, not swallowed
        catch (Exception e)
#pragma warning restore CA1031
        {
            request.Reply.TrySetException(e);
        }
    }

    /// <summary>Pins the current weights (EMA when kept) and has the workers sample them while training goes on.</summary>
    private void SampleNow(CancellationToken ct)
    {
        if (_samples is null) return;
        WeightsSnapshot snapshot;
        using (Model.TorchRuntime.Compute())
        {
            _run.State.FlushEma();
            snapshot = _parameters.Snapshot(true, (ulong)_run.State.StepsDone);
        }
        _samples.Start(snapshot, _run.State.StepsDone, ct);
    }
}
