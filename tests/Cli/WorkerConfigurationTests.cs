using System.Diagnostics;
using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Worker;

namespace DistDiffusion.Tests.Cli;

/// <summary>
/// The worker's settings from appsettings.json (section "Worker") and DISTDIFFUSION_Worker__* environment variables, as
/// `coordinator serve` reads its own, flags winning. Real worker processes, stopped by a bad value that names which
/// setting got through: none of them gets as far as loading libtorch.
/// </summary>
public sealed class WorkerConfigurationTests() : TempFolderTest("dd-worker-config")
{
    private (int Code, string Err) Worker(IReadOnlyDictionary<string, string> environment, string? appsettings, params string[] args)
    {
        var psi = RunCommand.WorkerStartInfo(["--coordinator", "http://127.0.0.1:1", "--give-up-after", "1", .. args]);
        foreach (var key in psi.Environment.Keys.Where(k => k.StartsWith(DistDiffusion.Protocol.Names.EnvironmentPrefix, StringComparison.Ordinal)).ToList())
            psi.Environment.Remove(key);
        foreach (var (key, value) in environment) psi.Environment[key] = value;
        var folder = Path.Combine(Dir, Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(folder);
        if (appsettings is not null) File.WriteAllText(Path.Combine(folder, "appsettings.json"), appsettings);
        psi.WorkingDirectory = folder;
        using var process = Process.Start(psi)!;
        var err = process.StandardError.ReadToEndAsync();
        _ = process.StandardOutput.ReadToEnd();
        Assert.True(process.WaitForExit(TimeSpan.FromSeconds(60)), "the worker did not exit");
        return (process.ExitCode, err.Result.Trim());
    }

    private static Dictionary<string, string> Env(params (string Key, string Value)[] pairs) =>
        pairs.ToDictionary(p => "DISTDIFFUSION_Worker__" + p.Key, p => p.Value);

    [Fact]
    public void AnEnvironmentVariableSetsAFlagsValueAndTheFlagWins()
    {
        Assert.Equal((2, "error: --cpu-scheduling fifo: expected batch or normal"), Worker(Env(("CpuScheduling", "fifo")), null));
        // The flag beats the variable (scheduling gets through), and the next variable is read: its bad value stops the worker.
        Assert.Equal((2, "error: --cpu-affinity 1-x: '1-x' is not a CPU number (0-1023) or a range of them; expected e.g. 1 or 0-3,8"),
            Worker(Env(("CpuScheduling", "fifo"), ("CpuAffinity", "1-x")), null, "--cpu-scheduling", "normal"));
    }

    [Fact]
    public void AppsettingsJsonInTheWorkingDirectoryIsReadAndTheEnvironmentBeatsIt()
    {
        const string json = """{ "Worker": { "LogLevel": "loud", "CpuScheduling": "fifo" } }""";
        Assert.Equal((2, "error: --log-level loud: expected debug, information, warning or error"), Worker(Env(), json));
        // The variable beats the file for the log level; the file's scheduling class is then the one refused.
        Assert.Equal((2, "error: --cpu-scheduling fifo: expected batch or normal"), Worker(Env(("LogLevel", "warning")), json));
        Assert.Equal((2, "error: --cpu-scheduling fifo: expected batch or normal"), Worker(Env(), json, "--log-level", "debug"));
    }

    [Fact]
    public void UnknownKeysAndValuesOfTheWrongTypeAreUsageErrorsNamingThem()
    {
        var (code, err) = Worker(Env(), """{ "Worker": { "Bogus": 1 } }""");
        Assert.Equal(2, code);
        Assert.StartsWith("error: configuration: ", err, StringComparison.Ordinal);
        Assert.Contains("Bogus", err, StringComparison.Ordinal);
        (code, err) = Worker(Env(("Threads", "many")), null);
        Assert.Equal(2, code);
        Assert.StartsWith("error: configuration: ", err, StringComparison.Ordinal);
        Assert.Contains("Worker:Threads", err, StringComparison.Ordinal);
    }

    [Fact]
    public void EverySettingsDefaultIsItsFlagsDefault()
    {
        var p = WorkerCli.Build().Parse([]);
        var s = new WorkerSettings();
        Assert.Equal(p.GetValue(WorkerCli.CoordinatorOption), s.Coordinator);
        Assert.Equal(p.GetValue(WorkerCli.TokenFileOption), s.TokenFile);
        Assert.Equal(p.GetValue(WorkerCli.ThreadsOption), s.Threads);
        Assert.Equal(p.GetValue(WorkerCli.DeviceOption), s.Device);
        Assert.Equal(p.GetValue(WorkerCli.TlsCaOption), s.TlsCa);
        Assert.Equal(p.GetValue(WorkerCli.TransportOption), s.Transport);
        Assert.Equal(p.GetValue(WorkerCli.GiveUpOption), s.GiveUpAfter);
        Assert.Equal(p.GetValue(WorkerCli.ExitWithParentOption), s.ExitWithParent);
        Assert.Equal(p.GetValue(WorkerCli.CpuSchedulingOption), s.CpuScheduling);
        Assert.Equal(p.GetValue(WorkerCli.CpuAffinityOption), s.CpuAffinity);
        Assert.Equal(p.GetValue(WorkerCli.LogLevelOption), s.LogLevel);
        Assert.Equal(p.GetValue(WorkerCli.LogFormatOption), s.LogFormat);
        // Every settable property has its flag: a new flag must not be forgotten in either place.
        Assert.Equal(WorkerCli.Build().Options.Count(o => o.Name.StartsWith("--", StringComparison.Ordinal) && o.Name is not "--help" and not "--version"),
            typeof(WorkerSettings).GetProperties().Count(x => x.CanWrite));
    }
}
