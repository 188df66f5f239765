using System.Diagnostics;
using System.Threading.Channels;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Grpc.Core;

namespace DistDiffusion.Coordinator.Workers;

/// <summary>
/// The coordinator's side of one worker's stream: identity, the outgoing queue (one writer task drains it; any thread
/// may send), the figures `coordinator status` shows (thread-safe), and the state each owner keeps apart: the training
/// loop's <see cref="Schedule"/> and the stream handler's <see cref="Inbox"/>.
/// </summary>
[System.Diagnostics.CodeAnalysis.SuppressMessage("Design", "CA1001", Justification = "The token source has no timer; the loop may abort a connection after its handler returned, so it is never disposed.")]
public sealed class WorkerConnection
{
    private static long _counter;
    /// <summary>
    /// Synchronous continuations: <see cref="Send"/> wakes no thread. The writer task, when waiting, takes the message and
    /// writes it on the sender's thread, up to the first write that cannot complete at once; a write's failure ends in
    /// that task (its handler cancels the call with CancelAsync, whose callbacks run elsewhere), never in the sender.
    /// </summary>
    private readonly Channel<CoordinatorMessage> _outbox = Channel.CreateUnbounded<CoordinatorMessage>(new UnboundedChannelOptions { SingleReader = true, AllowSynchronousContinuations = true });
    private readonly CancellationTokenSource _abort = new();
    private readonly Stopwatch _sinceSeen = Stopwatch.StartNew();
    private long _bytesIn, _bytesOut, _stepsDone;
    private double _computeSeconds;

    public WorkerConnection(Join join, string peer, bool socket = false)
    {
        Socket = socket;
        Id = $"w{Interlocked.Increment(ref _counter)}-{Guid.NewGuid().ToString("N")[..6]}";
        Host = join.Host;
        Device = join.Device;
        Threads = join.Threads;
        Peer = peer;
    }

    public string Id { get; }
    public string Host { get; }
    public string Device { get; }
    public int Threads { get; }
    public string Peer { get; }
    /// <summary>Its Trainer stream is on the worker socket, not a gRPC call.</summary>
    public bool Socket { get; }
    /// <summary>Written by the training loop's thread only (the roster and the step driver); status readers see a whole value.</summary>
    public WorkerState State { get => (WorkerState)Volatile.Read(ref _state); set => Volatile.Write(ref _state, (int)value); }
    private int _state = (int)WorkerState.Joining;
    /// <summary>What the training loop keeps about this worker: its thread alone reads and writes it.</summary>
    internal WorkerSchedule Schedule { get; } = new();
    /// <summary>What the handler of this worker's stream keeps between messages: that handler alone reads and writes it.</summary>
    internal WorkerInbox Inbox { get; } = new();
    /// <summary>
    /// The segment the worker mapped (payloads skip the stream): handed over once by the stream handler when the worker
    /// accepts the offer, read by the loop when it sends parameters, taken back and disposed by the loop when the worker is removed.
    /// </summary>
    public SharedTensorSegment? SharedMemory { get => Volatile.Read(ref _sharedMemory); set => Volatile.Write(ref _sharedMemory, value); }
    private SharedTensorSegment? _sharedMemory;

    /// <summary>Slices this worker computed with other bits than another worker (a silent-data-corruption signal).</summary>
    public int Disagreements => Volatile.Read(ref _disagreements);
    private int _disagreements;
    public int Disagree() => Interlocked.Increment(ref _disagreements);

    public CancellationToken Aborted => _abort.Token;
    /// <summary>Why the coordinator ended this stream (deadline, heartbeat): the status the worker gets.</summary>
    public Status? AbortStatus { get; private set; }

    public ChannelReader<CoordinatorMessage> Outbox => _outbox.Reader;

    public void Send(CoordinatorMessage message)
    {
        if (_outbox.Writer.TryWrite(message)) Interlocked.Add(ref _bytesOut, message.CalculateSize());
    }

    public void CloseOutbox() => _outbox.Writer.TryComplete();

    /// <summary>Ends the stream from the coordinator's side (the handler returns this status to the worker).</summary>
    public void Abort(StatusCode code, string detail)
    {
        AbortStatus ??= new Status(code, detail);
        _abort.Cancel();
    }

    public void Seen(long bytes)
    {
        Interlocked.Add(ref _bytesIn, bytes);
        lock (_sinceSeen) _sinceSeen.Restart();
    }

    public double SecondsSinceSeen { get { lock (_sinceSeen) return _sinceSeen.Elapsed.TotalSeconds; } }

    /// <summary>A slice of step <paramref name="step"/> was taken from this worker: counts the step once, however many slices it held.</summary>
    public void CompletedSlice(ulong step, double computeSeconds)
    {
        lock (_abort)
        {
            if (_lastStep != step) _stepsDone++;
            _lastStep = step;
            _computeSeconds += computeSeconds;
        }
    }

    private ulong? _lastStep;

    public WorkerStatus ToStatus()
    {
        long steps;
        double seconds;
        lock (_abort) (steps, seconds) = (_stepsDone, _computeSeconds);
        return new WorkerStatus
        {
            Id = Id,
            Host = Host,
            Device = Device,
            Threads = Threads,
            State = State,
            StepsDone = (ulong)steps,
            MeanStepSeconds = steps > 0 ? seconds / steps : 0,
            LastSeenSecondsAgo = SecondsSinceSeen,
            BytesIn = (ulong)Interlocked.Read(ref _bytesIn),
            BytesOut = (ulong)Interlocked.Read(ref _bytesOut),
            SharedMemory = SharedMemory is not null,
            Socket = Socket,
            Disagreements = (uint)Disagreements,
        };
    }
}
