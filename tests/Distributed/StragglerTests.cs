using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Protocol.V1;

namespace DistDiffusion.Tests.Distributed;

/// <summary>
/// Stragglers cost a short wait, not the step deadline, and change no bit: slow slices are copied to idle workers, a
/// straggler sits out until it answers, and copies must agree bit for bit. Real coordinator, real worker processes.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class StragglerTests() : TempFolderTest("dd-straggler")
{
    private static string Logs(IEnumerable<KeptOutputProcess> ps) => string.Join("\n---\n", ps.Select(p => p.Output));

    [Fact(Timeout = 150_000)]
    public async Task AWorkerThatHoldsASliceAndNeverAnswersCostsAShortWaitNotTheStepDeadline()
    {
        const int steps = 30;
        var reference = Cluster.LocalReference(Cluster.Recipe(steps), Path.Combine(Dir, "local"));
        var runDir = Path.Combine(Dir, "dist");
        var options = Cluster.Options(runDir, steps, minWorkers: 3);
        options.StepDeadlineSeconds = 600;   // without copies, the silent slice would hold the run for ten minutes
        await using var server = await Cluster.Start(options);
        // Joins first, heartbeats like a live worker, takes its slices and never answers.
        await using var stalled = await RawWorker.JoinAsync(server.Address);
        stalled.StartHeartbeats();
        var workers = new List<WorkerProcess> { new(server.Address, Cluster.Token), new(server.Address, Cluster.Token) };
        try
        {
            await server.Loop.Completion.WaitAsync(TimeSpan.FromSeconds(120));
            var status = server.Loop.Status();
            var silent = Assert.Single(status.Workers, w => w.Id == stalled.Welcome.WorkerId);
            Assert.NotEqual(WorkerState.Dropped, silent.State);   // not dropped: it is alive, only slow
            Assert.Equal(0ul, silent.StepsDone);
            Assert.InRange(server.Loop.BackupsIssued, 1, steps);
            // Its slice got a copy, then it sat out for good (it never answers): every assignment it was sent is of one
            // step. (Counting the run's copies instead would also count those of a healthy worker slowed by a busy machine.)
            var assigned = new List<ulong>();
            for (var m = await stalled.ReadAsync(); m.KindCase != CoordinatorMessage.KindOneofCase.Finish; m = await stalled.ReadAsync())
                if (m.KindCase == CoordinatorMessage.KindOneofCase.Assignment) assigned.Add(m.Assignment.Step);
            Assert.NotEmpty(assigned);
            Assert.Single(assigned.Distinct());
            Cluster.AssertSameState(reference, Cluster.Latest(runDir), Logs(workers));
            Cluster.AssertIdenticalFiles(Path.Combine(Dir, "local"), runDir);
        }
        finally
        {
            foreach (var w in workers) w.Dispose();
            reference.DisposeTensors();
        }
    }

    [Fact(Timeout = 150_000)]
    public async Task VerifyingEverySliceOnASecondWorkerFindsTheSameBits()
    {
        const int steps = 15;
        var reference = Cluster.LocalReference(Cluster.Recipe(steps), Path.Combine(Dir, "local"));
        var runDir = Path.Combine(Dir, "dist");
        var options = Cluster.Options(runDir, steps, minWorkers: 3);
        options.VerifyFraction = 1;
        options.StragglerFactor = 1e6;   // only verification copies
        await using var server = await Cluster.Start(options);
        var workers = Enumerable.Range(0, 3).Select(_ => new WorkerProcess(server.Address, Cluster.Token, 1)).ToList();
        try
        {
            await server.Loop.Completion.WaitAsync(TimeSpan.FromSeconds(120));
            // Second results arrive after their step when the first holder was quicker: give the last ones a moment.
            await Cluster.WaitUntil(() => server.Loop.ResultsCompared >= steps, TimeSpan.FromSeconds(20), "verification copies to be compared", () => Logs(workers));
            var status = server.Loop.Status();
            Assert.All(status.Workers, w => Assert.Equal(0u, w.Disagreements));
            Cluster.AssertIdenticalFiles(Path.Combine(Dir, "local"), runDir);
        }
        finally
        {
            foreach (var w in workers) w.Dispose();
            reference.DisposeTensors();
        }
    }
}
