using System.Globalization;
using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Protocol;

namespace DistDiffusion.Bench;

/// <summary>One stretch of a step's critical path: where it runs, and its duration over the steps analysed (ms).</summary>
public sealed record TimelinePhase(string Name, string Where, double MedianMs, double MeanMs, double P90Ms);

/// <summary>
/// Where the steps' time went (<see cref="StepTimelineAnalysis"/>): the critical path's phases, which add up to each step,
/// and the wait for the slower worker (off that path: the faster worker's idle time beyond the common part).
/// </summary>
public sealed record TimelineReport(int Steps, int Workers, double StepMedianMs, double StepMeanMs, IReadOnlyList<TimelinePhase> Phases, TimelinePhase Imbalance, TimelinePhase Sending);

/// <summary>
/// Reads the marks a `coordinator run` wrote with <see cref="StepTimeline"/> (one coordinator file, one per worker) and
/// follows each step along its critical path: the worker whose gradient came last, from its assignment through its push,
/// the coordinator's receipt, check, sum and update, to the next step's parameters loaded in that worker and its next
/// assignment. Consecutive marks telescope, so the phases of a step add up to its time exactly.
/// </summary>
public static class StepTimelineAnalysis
{
    private static readonly (string Name, string Where)[] PhaseNames =
    [
        ("compute", "worker: forward, backward, gradient into its buffer or shared region"),
        ("push", "worker + kernel: the gradient's header (and chunks) onto its stream, until the coordinator reads it"),
        ("copy + check", "coordinator: copied out of the region or assembled, checked, sum of squares"),
        ("to loop", "coordinator: the training loop's thread takes it up"),
        ("accept", "coordinator: slice guard, acknowledgement, round complete"),
        ("sum", "coordinator: the slices added in the tree's order"),
        ("update", "coordinator: gradient norm, Adam, new parameters into the broadcast buffer"),
        ("between steps", "coordinator: status, logs, the next step's plan"),
        ("parameters out", "coordinator + worker: parameters into the region (or onto the stream), loaded into the network"),
        ("start", "worker: the assignment reaches its compute"),
    ];

    public static TimelineReport Analyze(string folder, long skipSteps)
    {
        var coordinatorFiles = Directory.GetFiles(folder, "coordinator-*.tsv");
        if (coordinatorFiles.Length != 1)
            throw new InvalidDataException($"{folder}: expected one coordinator timeline, found {coordinatorFiles.Length}");
        var coordinator = Read(coordinatorFiles[0]);
        var frequency = Frequency(coordinatorFiles[0]);
        var workers = Directory.GetFiles(folder, "worker-*.tsv").Select(Read).ToList();
        if (workers.Count == 0) throw new InvalidDataException($"{folder}: no worker timeline");
        var last = coordinator.Keys.Where(k => k.Mark == StepMark.Applied).Select(k => k.Step).DefaultIfEmpty(0UL).Max();
        var chains = new List<double[]>();
        var imbalance = new List<double>();
        var sending = new List<double>();
        for (var s = (ulong)Math.Max(0, skipSteps); s < last; s++)
        {
            // The step's last gradient: the worker that computed this step and finished last.
            var computing = workers.Where(w => w.ContainsKey((StepMark.WorkerComputed, s))).ToList();
            if (computing.Count == 0) continue;
            var w = computing.MaxBy(x => x[(StepMark.WorkerComputed, s)][0])!;
            if (computing.Count > 1) imbalance.Add(Ms(w[(StepMark.WorkerComputed, s)][0] - computing.Min(x => x[(StepMark.WorkerComputed, s)][0])));
            long? First(Dictionary<(StepMark, ulong), List<long>> marks, StepMark m, ulong step) => marks.TryGetValue((m, step), out var t) ? t[0] : null;
            long? Latest(StepMark m) => coordinator.TryGetValue((m, s), out var t) ? t.Max() : null;
            long?[] chain =
            [
                First(w, StepMark.WorkerAssigned, s), First(w, StepMark.WorkerComputed, s), Latest(StepMark.Received), Latest(StepMark.Delivered), Latest(StepMark.Taken), Latest(StepMark.Complete),
                Latest(StepMark.Summed), Latest(StepMark.Applied), First(coordinator, StepMark.Planned, s + 1),
                First(w, StepMark.WorkerLoaded, s + 1), First(w, StepMark.WorkerAssigned, s + 1),
            ];
            if (chain.Any(t => t is null)) continue;   // this worker sat the next step out, or the run ended
            if (First(coordinator, StepMark.Assigned, s + 1) is { } assigned) sending.Add(Ms(assigned - chain[8]!.Value));
            chains.Add([.. chain.Zip(chain.Skip(1), (a, b) => Ms(b!.Value - a!.Value))]);
        }
        if (chains.Count == 0) throw new InvalidDataException($"{folder}: no complete step after step {skipSteps}");
        var steps = chains.Select(c => c.Sum()).ToList();
        var phases = PhaseNames.Select((p, i) => Stats(p.Name, p.Where, chains.Select(c => c[i]).ToList())).ToList();
        return new TimelineReport(chains.Count, workers.Count, CliSupport.Median(steps), steps.Average(), phases,
            Stats("wait for the slower worker", "off the path: the faster worker's gradient waits for the other's", imbalance.Count > 0 ? imbalance : [0.0]),
            Stats("of which sending", "coordinator, within parameters out: every worker's parameters and assignment handed to its stream", sending.Count > 0 ? sending : [0.0]));

        double Ms(long ticks) => ticks * 1000.0 / frequency;
    }

    private static TimelinePhase Stats(string name, string where, List<double> values)
    {
        values.Sort();
        return new TimelinePhase(name, where, CliSupport.Median(values), values.Average(), values[(int)(values.Count * 0.9)]);
    }

    private static long Frequency(string file)
    {
        var first = File.ReadLines(file).First().Split('\t');
        return first.Length == 2 && first[0] == "# ticks/s" && long.TryParse(first[1], NumberStyles.Integer, CultureInfo.InvariantCulture, out var f) && f > 0
            ? f : throw new InvalidDataException($"{file}: first line is not '# ticks/s<TAB>frequency'");
    }

    /// <summary>A timeline file's marks by (mark, step), each with its times in the order recorded.</summary>
    private static Dictionary<(StepMark Mark, ulong Step), List<long>> Read(string file)
    {
        var marks = new Dictionary<(StepMark, ulong), List<long>>();
        foreach (var (line, number) in File.ReadLines(file).Select((l, i) => (l, i + 1)).Skip(1))
        {
            var f = line.Split('\t');
            if (f.Length != 3 || !Enum.TryParse<StepMark>(f[0], out var mark) || !ulong.TryParse(f[1], NumberStyles.Integer, CultureInfo.InvariantCulture, out var step)
                || !long.TryParse(f[2], NumberStyles.Integer, CultureInfo.InvariantCulture, out var ticks))
                throw new InvalidDataException($"{file} line {number}: expected mark<TAB>step<TAB>ticks, got '{line}'");
            if (!marks.TryGetValue((mark, step), out var times)) marks[(mark, step)] = times = [];
            times.Add(ticks);
        }
        return marks;
    }
}
