using System.Diagnostics;
using System.Text.RegularExpressions;
using DistDiffusion.Coordinator.Cli;

namespace DistDiffusion.Tests.Cli;

/// <summary>`--version` of the executables: the project's version and the commit they were built from.</summary>
public sealed partial class VersionTests
{
    private static string Run(ProcessStartInfo psi)
    {
        using var process = Process.Start(psi)!;
        var output = process.StandardOutput.ReadToEnd();
        process.WaitForExit();
        Assert.True(process.ExitCode == 0, $"{psi.FileName} --version exited with {process.ExitCode}: {process.StandardError.ReadToEnd()}");
        return output.Trim();
    }

    [Fact]
    public void CoordinatorWorkerAndBenchPrintTheVersionAndTheCommitTheyWereBuiltFrom()
    {
        var coordinator = Run(RunCommand.StartInfo("coordinator", ["--version"]));
        var worker = Run(RunCommand.WorkerStartInfo(["--version"]));
        var bench = Run(RunCommand.StartInfo("bench", ["--version"]));
        var m = VersionLine().Match(coordinator);
        Assert.True(m.Success, $"coordinator --version printed '{coordinator}'");
        Assert.NotEqual("1.0.0", m.Groups["version"].Value);
        Assert.Equal(coordinator, worker);
        Assert.Equal(coordinator, bench);
        var commit = m.Groups["commit"].Value;
        if (commit == "unknown")
        {
            // Only a build outside a git checkout (or without git) may not know its commit.
            Assert.False(Directory.Exists(Path.Combine(Repository.Root, ".git")) || File.Exists(Path.Combine(Repository.Root, ".git")),
                "built in a git checkout, yet the commit is unknown");
            return;
        }
        // A commit of this repository (HEAD may have moved on since the build).
        using var git = Process.Start(new ProcessStartInfo("git", ["-C", Repository.Root, "cat-file", "-t", commit]) { RedirectStandardOutput = true, RedirectStandardError = true })!;
        var type = git.StandardOutput.ReadToEnd().Trim();
        git.WaitForExit();
        Assert.Equal("commit", type);
    }

    [GeneratedRegex(@"^(?<version>\d+\.\d+\.\d+)\+(?<commit>[0-9a-f]{40}|unknown)$")]
    private static partial Regex VersionLine();
}
