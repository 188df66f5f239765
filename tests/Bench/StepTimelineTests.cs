using System.Globalization;
using DistDiffusion.Bench;
using DistDiffusion.Protocol;
using DistDiffusion.Tests.Distributed;

namespace DistDiffusion.Tests.Bench;

/// <summary>`bench timeline`: the marks each process records and how a step is followed through them.</summary>
[Collection(ClusterCollection.Name)]
public sealed class StepTimelineTests() : TempFolderTest("dd-timeline")
{
    private static void WriteMarks(string file, IEnumerable<(StepMark Mark, ulong Step, long Micros)> marks) =>
        File.WriteAllLines(file, ["# ticks/s\t1000000", .. marks.Select(m => string.Create(CultureInfo.InvariantCulture, $"{m.Mark}\t{m.Step}\t{m.Micros}"))]);

    [Fact]
    public void EachStepFollowsTheWorkerThatFinishedLastAndItsPhasesAddUpToTheStep()
    {
        // Steps of 6 ms (1 tick = 1 us). Worker 2 finishes each step 0.5 ms after worker 1; step 2 has no next step.
        var coordinator = new List<(StepMark, ulong, long)>();
        var first = new List<(StepMark, ulong, long)>();
        var last = new List<(StepMark, ulong, long)>();
        for (ulong s = 0; s <= 2; s++)
        {
            var t = (long)s * 6000;
            first.AddRange([(StepMark.WorkerAssigned, s, t + 30), (StepMark.WorkerComputed, s, t + 4000)]);
            last.AddRange([(StepMark.WorkerAssigned, s, t), (StepMark.WorkerComputed, s, t + 4500)]);
            coordinator.AddRange([(StepMark.Received, s, t + 4100), (StepMark.Delivered, s, t + 4200), (StepMark.Taken, s, t + 4250),
                (StepMark.Received, s, t + 4600), (StepMark.Delivered, s, t + 4700), (StepMark.Taken, s, t + 4750),
                (StepMark.Complete, s, t + 4800), (StepMark.Summed, s, t + 4900), (StepMark.Applied, s, t + 5300)]);
            if (s == 2) continue;
            coordinator.AddRange([(StepMark.Planned, s + 1, t + 5350), (StepMark.Assigned, s + 1, t + 5500)]);
            first.Add((StepMark.WorkerLoaded, s + 1, t + 5600));
            last.Add((StepMark.WorkerLoaded, s + 1, t + 5900));
        }
        WriteMarks(Path.Combine(Dir, "coordinator-1.tsv"), coordinator);
        WriteMarks(Path.Combine(Dir, "worker-2.tsv"), first);
        WriteMarks(Path.Combine(Dir, "worker-3.tsv"), last);

        var r = StepTimelineAnalysis.Analyze(Dir, skipSteps: 0);
        Assert.Equal(2, r.Steps);     // steps 0 and 1; step 2 never reached the next assignment
        Assert.Equal(2, r.Workers);
        Assert.Equal(6.0, r.StepMedianMs, 9);
        double[] expected = [4.5, 0.1, 0.1, 0.05, 0.05, 0.1, 0.4, 0.05, 0.55, 0.1];
        Assert.Equal(expected.Length, r.Phases.Count);
        for (var i = 0; i < expected.Length; i++) Assert.Equal(expected[i], r.Phases[i].MedianMs, 9);
        Assert.Equal(r.StepMeanMs, r.Phases.Sum(p => p.MeanMs), 9);
        Assert.Equal(0.5, r.Imbalance.MedianMs, 9);
        Assert.Equal(0.15, r.Sending.MedianMs, 9);
        Assert.Equal(1, StepTimelineAnalysis.Analyze(Dir, skipSteps: 1).Steps);

        File.AppendAllText(Path.Combine(Dir, "worker-3.tsv"), "Computed\tnot-a-step\t12\n");
        var bad = Assert.Throws<InvalidDataException>(() => StepTimelineAnalysis.Analyze(Dir, 0));
        Assert.Contains("worker-3.tsv line 10: expected mark<TAB>step<TAB>ticks", bad.Message, StringComparison.Ordinal);
        File.Delete(Path.Combine(Dir, "coordinator-1.tsv"));
        Assert.Contains("expected one coordinator timeline, found 0", Assert.Throws<InvalidDataException>(() => StepTimelineAnalysis.Analyze(Dir, 0)).Message, StringComparison.Ordinal);
    }

    [Fact(Timeout = 180_000)]
    public async Task ARealRunIsFollowedAcrossItsThreeProcessesInCausalOrder()
    {
        var marks = Path.Combine(Dir, "marks");
        var (exit, log) = await Task.Run(() =>
        {
            var code = TimelineCommand.Run("swissroll", workers: 2, steps: 120, Path.Combine(Dir, "run"), marks, ["seed=5"], sharedMemory: true, TrainerTransport.Socket, out var output);
            return (code, output);
        });
        Assert.True(exit == 0, log);
        Assert.Single(Directory.GetFiles(marks, "coordinator-*.tsv"));
        Assert.Equal(2, Directory.GetFiles(marks, "worker-*.tsv").Length);
        var r = StepTimelineAnalysis.Analyze(marks, skipSteps: 20);
        Assert.Equal(2, r.Workers);
        Assert.True(r.Steps >= 90, $"{r.Steps} steps followed of 99");
        // Marks in different processes on one clock: each phase's median is >= 0 only if every mark sits where the
        // protocol says (the coordinator reads a header after the worker computed it, and so on).
        Assert.All(r.Phases, p => Assert.True(p.MedianMs >= 0, $"{p.Name}: median {p.MedianMs} ms"));
        Assert.True(r.Phases[0].MedianMs > 0.5, $"compute {r.Phases[0].MedianMs} ms");
    }
}
