namespace DistDiffusion.Coordinator.Training;

/// <summary>The loop's queue: what the stream handlers post, how the loop waits for the next event, and the joins, departures and stray pushes it handles between steps.</summary>
public sealed partial class TrainingLoop
{
    internal void Post(LoopEvent e) => _events.Writer.TryWrite(e);

    void IStepHost.Publish(StepSnapshot? snapshot) => _current = snapshot;

    void IStepHost.Serve(WeightsRequested request) => Serve(request);

    void IStepHost.Gone(WorkerGone gone) => Gone(gone);

    Task<LoopEvent?> IStepHost.NextEventAsync(TimeSpan timeout, CancellationToken ct) => NextEventAsync(timeout, ct);

    /// <summary>
    /// The worker's stream handler has ended (it posts this last): remove the worker, and unmap its shared memory, which
    /// nobody reads any more (the handler copied gradients out of it; only this loop wrote parameters into it).
    /// </summary>
    private void Gone(WorkerGone g)
    {
        _workers.Remove(g.Worker, g.Departure, g.Reason);
        var segment = g.Worker.SharedMemory;
        g.Worker.SharedMemory = null;
        segment?.Dispose();
    }

    /// <summary>Waits up to <paramref name="timeout"/> for one event and handles joins and departures (outside a step).</summary>
    private async Task HandleNextAsync(TimeSpan timeout, CancellationToken ct)
    {
        var e = await NextEventAsync(timeout, ct);
        switch (e)
        {
            case WorkerJoined j: _workers.Register(j.Worker); break;
            case WorkerGone g: Gone(g); break;
            case GradientArrived a:
                StepDriver.Answered(a.Gradient.Worker, a.Gradient.Step, a.Gradient.Slice);
                StepDriver.Ack(a.Gradient, applied: false, "no step in progress");
                GradientBuffers.Return(a.Gradient.Values);
                break;
            case DuplicateSeen d:
                StepDriver.Answered(d.Worker, d.Step, d.Slice);
                break;
            case WeightsRequested w: Serve(w); break;
        }
    }

    private async Task<LoopEvent?> NextEventAsync(TimeSpan timeout, CancellationToken ct)
    {
        if (_events.Reader.TryRead(out var ready)) return ready;   // no timer to set up and tear down
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        cts.CancelAfter(timeout);
        try
        {
            return await _events.Reader.ReadAsync(cts.Token);
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
            // The timeout's cancellation ran this continuation on the timer's thread: the loop goes on elsewhere.
            await Task.Yield();
            return null;
        }
    }
}
