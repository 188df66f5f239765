using System.Diagnostics;
using System.Text.Json.Nodes;
using DistDiffusion.Coordinator.Cli;

namespace DistDiffusion.Tests.Distributed;

/// <summary>
/// The dashboard in a real headless browser (Debian's chromium; .ci/run installs it where missing) against a live
/// `coordinator run`: the page takes the token from its URL fragment, keeps it in sessionStorage, polls the API and fills
/// in the run, the loss curve, the workers and the latest samples.
/// </summary>
[Collection(ClusterCollection.Name)]
public sealed class DashboardBrowserTests() : TempFolderTest("dd-dashboard")
{
    private static async Task<string> Chromium(string profile, params string[] args)
    {
        var psi = new ProcessStartInfo("chromium")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        // --no-sandbox: the tests may run as root (in containers), where Chromium refuses its sandbox.
        foreach (var a in (string[])["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars", $"--user-data-dir={profile}", .. args]) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi) ?? throw new InvalidOperationException("could not start chromium (apt-get install chromium)");
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        await p.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(90));
        Assert.True(p.ExitCode == 0, $"chromium exited with {p.ExitCode}: {await stderr}");
        return await stdout;
    }

    [Fact(Timeout = 300_000)]
    public async Task TheDashboardShowsALiveRunInAHeadlessBrowser()
    {
        var runDir = Path.Combine(Dir, "run");
        using var run = new CoordinatorProcess(["run", "--workers", "2", "--worker-threads", "1", "--recipe", "swissroll", "--steps", "1000000", "--out", runDir, "--log-every", "5",
            .. Cluster.Sets(checkpointEvery: 20).SelectMany(s => new[] { "--set", s }), "--set", "sample-every=20"]);
        var samples = Path.Combine(runDir, "samples");
        await Cluster.WaitUntil(() => (Directory.Exists(samples) && Directory.EnumerateFiles(samples).Any()) || run.Process.HasExited, TimeSpan.FromSeconds(120), "the first samples", () => run.Output);
        Assert.False(run.Process.HasExited, run.Output);
        await Cluster.WaitUntil(() => Directory.Exists(Path.Combine(runDir, "checkpoints")) && Directory.EnumerateDirectories(Path.Combine(runDir, "checkpoints")).Any(), TimeSpan.FromSeconds(60), "a checkpoint", () => run.Output);
        var http = JsonNode.Parse(File.ReadAllText(Path.Combine(runDir, RunEndpoints.FileName)))!["http"]!.GetValue<string>();
        var token = File.ReadAllText(Path.Combine(runDir, "token")).Trim();

        // Without the token the page asks for it (and shows no data).
        var anonymous = await Chromium(Path.Combine(Dir, "profile-anonymous"), "--virtual-time-budget=3000", "--dump-dom", http + "/");
        Assert.Contains("id=\"login\" class=\"card\" style=\"display: block;\"", anonymous, StringComparison.Ordinal);
        Assert.Contains("<div id=\"main\" hidden=\"\">", anonymous, StringComparison.Ordinal);

        var dom = await Chromium(Path.Combine(Dir, "profile"), "--virtual-time-budget=5000", "--dump-dom", $"{http}/#token={token}");
        Assert.Contains("<div id=\"main\">", dom, StringComparison.Ordinal);
        Assert.Matches("id=\"state\">training<", dom);
        Assert.Matches("id=\"step\">[0-9]+ of 1000000<", dom);
        Assert.Matches("id=\"loss\">[0-9.]+<", dom);
        Assert.Equal(2, System.Text.RegularExpressions.Regex.Count(dom, "<td>w[0-9]+-[0-9a-f]+</td>"));
        Assert.Matches("<td>step [0-9]+</td>", dom);                      // the checkpoints table
        Assert.Matches("id=\"sample\" alt=\"latest samples\" src=\"blob:", dom);
        Assert.Matches("id=\"sampleName\">step-[0-9]+\\.png<", dom);
        Assert.DoesNotContain(token, dom, StringComparison.Ordinal);         // the fragment is dropped from the address bar

        var screenshot = Path.Combine(Dir, "dashboard.png");
        await Chromium(Path.Combine(Dir, "profile-shot"), "--window-size=1280,900", "--virtual-time-budget=5000", $"--screenshot={screenshot}", $"{http}/#token={token}");
        var png = Model.Imaging.PngReader.Read(screenshot);
        Assert.Equal((1280, 900), (png.Width, png.Height));
        // DISTDIFFUSION_SCREENSHOT=path keeps the picture (docs/dashboard.png is made this way).
        if (Environment.GetEnvironmentVariable("DISTDIFFUSION_SCREENSHOT") is { Length: > 0 } keep) File.Copy(screenshot, keep, overwrite: true);
    }
}
