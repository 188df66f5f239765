using DistDiffusion.Protocol.V1;

namespace DistDiffusion.Coordinator.Workers;

/// <summary>
/// Which workers the training loop may give slices to. A worker that connects is joining until the loop admits it at a
/// step boundary (or when orphaned slices need it); it is live until it leaves or is dropped. The known list (for
/// status) keeps departed workers for ten minutes, the newest <see cref="MaxDeparted"/> of them. Live and joining lists belong to the loop's thread; the known list
/// is read by status calls under <paramref name="statusLock"/>.
/// </summary>
internal sealed class WorkerRoster(object statusLock, ILogger log)
{
    private readonly List<WorkerConnection> _live = [];
    private readonly List<WorkerConnection> _joining = [];
    private readonly List<WorkerConnection> _known = [];

    /// <summary>Most departed workers kept for status (besides the ten-minute limit).</summary>
    public const int MaxDeparted = 1000;

    public IReadOnlyList<WorkerConnection> Live => _live;
    public bool AnyJoining => _joining.Count > 0;
    /// <summary>Everyone connected, live or joining (to tell them the run is over).</summary>
    public IEnumerable<WorkerConnection> Connected => _live.Concat(_joining);

    /// <summary>A worker connected: it joins at the next step boundary.</summary>
    public void Register(WorkerConnection w)
    {
        _joining.Add(w);
        lock (statusLock)
        {
            _known.RemoveAll(k => k.State is WorkerState.Dropped or WorkerState.Left && k.SecondsSinceSeen > 600);
            // A worker that reconnects in a loop must not grow the list without bound: the oldest departed ones go first.
            var departed = _known.Count(k => k.State is WorkerState.Dropped or WorkerState.Left);
            for (var i = 0; i < _known.Count && departed > MaxDeparted;)
            {
                if (_known[i].State is WorkerState.Dropped or WorkerState.Left)
                {
                    _known.RemoveAt(i);
                    departed--;
                }
                else i++;
            }
            _known.Add(w);
        }
    }

    /// <summary>Joined workers become live.</summary>
    public void Admit(long step)
    {
        foreach (var w in _joining)
        {
            w.State = WorkerState.Idle;
            _live.Add(w);
            log.LogInformation("Worker {Worker} ({Host}, {Device}) admitted at step {Step}; {Count} live", w.Id, w.Host, w.Device, step, _live.Count);
        }
        _joining.Clear();
    }

    /// <summary>The worker left or was dropped (<paramref name="departure"/>); it gets no more slices. A worker dropped first stays dropped.</summary>
    public void Remove(WorkerConnection w, WorkerState departure, string reason)
    {
        if (departure is not (WorkerState.Dropped or WorkerState.Left))
            throw new ArgumentOutOfRangeException(nameof(departure), departure, "expected Left or Dropped");
        var wasLive = _live.Remove(w) | _joining.Remove(w);
        if (w.State is not (WorkerState.Dropped or WorkerState.Left))
            w.State = departure;
        if (wasLive) log.LogWarning("Worker {Worker} removed: {Reason}; {Count} live", w.Id, reason, _live.Count);
    }

    /// <summary>Status of every known worker; call under the status lock.</summary>
    public IEnumerable<WorkerStatus> Statuses() => _known.Select(w => w.ToStatus());
}
