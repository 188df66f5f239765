using System.Diagnostics;
using System.Globalization;

namespace DistDiffusion.Protocol;

/// <summary>
/// The points of a distributed step where the coordinator and its workers record the time, in the order one step's
/// critical path passes them: a worker's slice from its assignment to its push, the coordinator from the push's arrival
/// to the new parameters, and the next step's parameters back into the worker (`coordinator benchmark-timeline`).
/// </summary>
public enum StepMark : byte
{
    /// <summary>Worker: an assignment starts computing (its parameters are loaded).</summary>
    WorkerAssigned,
    /// <summary>Worker: the slice's gradient is in its outgoing buffer or shared region.</summary>
    WorkerComputed,
    /// <summary>Coordinator: a gradient header arrives on a worker's stream.</summary>
    Received,
    /// <summary>Coordinator: that gradient is copied out or assembled, checked, and posted to the training loop.</summary>
    Delivered,
    /// <summary>Coordinator: the loop takes it up.</summary>
    Taken,
    /// <summary>Coordinator: every slice of the step is in.</summary>
    Complete,
    /// <summary>Coordinator: the slices are summed in the tree's order.</summary>
    Summed,
    /// <summary>Coordinator: Adam applied, the new parameters published.</summary>
    Applied,
    /// <summary>Coordinator: the next step planned (its assignments go out next).</summary>
    Planned,
    /// <summary>Coordinator: that step's parameters and assignments all handed to the workers' streams.</summary>
    Assigned,
    /// <summary>Worker: parameters loaded into its network (marked with the step they are for).</summary>
    WorkerLoaded,
}

/// <summary>
/// Per-step timestamps for `coordinator benchmark-timeline`, which names where a step's time goes across processes. Off
/// unless <see cref="Variable"/> names a folder: then each process keeps its marks in memory (a preallocated array, no
/// allocation per mark) and writes them to <c>{role}-{pid}.tsv</c> there when it exits. Timestamps are
/// <see cref="Stopwatch.GetTimestamp"/> ticks: CLOCK_MONOTONIC on Linux, comparable between processes of one machine.
/// </summary>
public static class StepTimeline
{
    public const string Variable = "DISTDIFFUSION_STEP_TIMELINE";
    private const int Capacity = 1 << 20;
    private static readonly string? Folder = Environment.GetEnvironmentVariable(Variable) is { Length: > 0 } folder ? folder : null;
    private static (StepMark Mark, ulong Step, long Ticks)[]? _marks;
    private static int _count;
    private static string _role = "";
    private static int _saved;

    /// <summary>Whether this process records (the variable was set when it started).</summary>
    public static bool Enabled => Folder is not null;

    /// <summary>Starts recording as <paramref name="role"/> (coordinator, worker) when enabled; the marks are written at exit.</summary>
    public static void Start(string role)
    {
        if (Folder is null || _marks is not null) return;
        _role = role;
        _marks = new (StepMark, ulong, long)[Capacity];
        AppDomain.CurrentDomain.ProcessExit += (_, _) => Save();
    }

    /// <summary>Records <paramref name="mark"/> of <paramref name="step"/> now (a no-op when not recording, or once full).</summary>
    public static void Mark(StepMark mark, ulong step)
    {
        if (_marks is not { } marks) return;
        var i = Interlocked.Increment(ref _count) - 1;
        if (i < marks.Length) marks[i] = (mark, step, Stopwatch.GetTimestamp());
    }

    /// <summary>Writes the marks (once; also at exit): mark name, step, ticks, one per line, after a line with the tick frequency.</summary>
    public static void Save()
    {
        if (_marks is not { } marks || Interlocked.Exchange(ref _saved, 1) == 1) return;
        Directory.CreateDirectory(Folder!);
        using var writer = new StreamWriter(Path.Combine(Folder!, $"{_role}-{Environment.ProcessId}.tsv"));
        writer.WriteLine(string.Create(CultureInfo.InvariantCulture, $"# ticks/s\t{Stopwatch.Frequency}"));
        for (var i = 0; i < Math.Min(Volatile.Read(ref _count), marks.Length); i++)
            writer.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{marks[i].Mark}\t{marks[i].Step}\t{marks[i].Ticks}"));
    }
}
