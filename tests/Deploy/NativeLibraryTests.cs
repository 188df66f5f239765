using System.Diagnostics;
using System.IO.Compression;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text.Json;
using System.Text.RegularExpressions;
using Xunit.Abstractions;

namespace DistDiffusion.Tests.Deploy;

/// <summary>
/// The build's copy of TorchSharp's libLibTorchSharp.so (Directory.Build.targets marks its GLIBCXX_3.4.32 need weak),
/// checked from the outside: against the file in the NuGet package, with an ELF reader of the tests' own
/// (<see cref="ElfVersions"/>) and readelf where it is installed, and by starting the real executables.
/// </summary>
public sealed partial class NativeLibraryTests(ITestOutputHelper output)
{
    private const string PatchedVersion = "GLIBCXX_3.4.32";
    private const string LibStdCxx = "libstdc++.so.6";
    private const string NativeFolder = "runtimes/linux-x64/native";
    private const string TorchSharpNative = "libLibTorchSharp.so";

    /// <summary>The four build outputs that carry the library: both executables and both test projects.</summary>
    public static TheoryData<string> Outputs => new() { "src/Coordinator", "src/Worker", "tests", "tests/Deploy" };

    [Theory]
    [MemberData(nameof(Outputs))]
    public void The_build_output_differs_from_the_package_only_in_the_weak_flag_of_GLIBCXX_3_4_32(string project)
    {
        var patched = NativeLibraries.OutputLibrary(project);
        Assert.True(File.Exists(patched), $"{patched} is missing: build the solution (scripts/setup.sh) before these tests");
        var original = NativeLibraries.CachedLibrary();
        ManifestTests.AssertNone(NativeLibraries.PatchProblems(File.ReadAllBytes(original), File.ReadAllBytes(patched)));

        // Where binutils is installed, its reading must agree with ours.
        if (Readelf(patched) is { } patchedTable && Readelf(original) is { } originalTable)
        {
            Assert.Matches($@"Name: {Regex.Escape(PatchedVersion)}\s+Flags: WEAK\s", patchedTable);
            Assert.Matches($@"Name: {Regex.Escape(PatchedVersion)}\s+Flags: none\s", originalTable);
            Assert.Equal(1, Regex.Count(patchedTable, @"Flags: WEAK\s"));
        }
    }

    [Fact]
    public void The_NuGet_cache_holds_the_library_exactly_as_the_package_archive_has_it()
    {
        var cached = NativeLibraries.CachedLibrary();
        var folder = Path.GetDirectoryName(Path.GetDirectoryName(Path.GetDirectoryName(Path.GetDirectoryName(cached))))!;
        var archive = Directory.EnumerateFiles(folder, "*.nupkg").Single();
        // The archive is the one NuGet downloaded: its SHA-512 is the one NuGet recorded beside it.
        var recorded = File.ReadAllText(archive + ".sha512").Trim();
        using (var stream = File.OpenRead(archive))
            Assert.Equal(recorded, Convert.ToBase64String(SHA512.HashData(stream)));
        using var zip = ZipFile.OpenRead(archive);
        var entry = zip.GetEntry($"{NativeFolder}/{TorchSharpNative}") ?? throw new InvalidDataException($"{archive} has no {NativeFolder}/{TorchSharpNative}");
        using var packaged = new MemoryStream();
        using (var s = entry.Open()) s.CopyTo(packaged);
        Assert.True(packaged.ToArray().AsSpan().SequenceEqual(File.ReadAllBytes(cached)), $"{cached} differs from {entry.FullName} in {archive}: something wrote through to the NuGet cache");
        var need = ElfVersions.Read(cached).Needs.Single(n => n.File == LibStdCxx && n.Version == PatchedVersion);
        Assert.False(need.Weak, $"{cached}: the package's own {PatchedVersion} need is weak: the check would compare a patched file with itself");
    }

    /// <summary>
    /// Every version the native libraries that TorchSharp and SkiaSharp load ask of the C and C++ runtime is provided by
    /// this machine's libraries, except weak ones: the loader would refuse the others.
    /// </summary>
    [Fact]
    public void Every_hard_version_need_of_the_loaded_native_libraries_is_provided_by_this_machines_libraries()
    {
        var folder = Path.Combine(RepoFiles.Root, "src/Coordinator", NativeLibraries.ConfigurationFolder, NativeFolder);
        string[] loaded = [TorchSharpNative, "libtorch.so", "libtorch_cpu.so", "libc10.so", "libSkiaSharp.so", .. Directory.GetFiles(folder, "libgomp*.so*").Select(Path.GetFileName).OfType<string>()];
        var problems = new List<string>();
        var provided = new Dictionary<string, IReadOnlyList<string>?>(StringComparer.Ordinal);
        var weakMissing = new List<string>();
        foreach (var name in loaded)
        {
            foreach (var need in ElfVersions.Read(Path.Combine(folder, name)).Needs)
            {
                if (!provided.TryGetValue(need.File, out var versions))
                {
                    var system = NativeLibraries.SystemLibrary(need.File) ?? (File.Exists(Path.Combine(folder, need.File)) ? Path.Combine(folder, need.File) : null);
                    provided[need.File] = versions = system is null ? null : ElfVersions.Read(system).Definitions;
                }
                if (versions is null) problems.Add($"{name} needs {need.File}, found neither in the system library folders nor beside it");
                else if (!versions.Contains(need.Version))
                {
                    if (need.Weak) weakMissing.Add($"{name}: {need.File} {need.Version} (weak)");
                    else problems.Add($"{name} needs {need.Version} of {need.File}, which this machine's {need.File} does not define");
                }
            }
        }
        output.WriteLine(weakMissing.Count == 0 ? "every version need is provided" : "missing but weak: " + string.Join("; ", weakMissing));
        ManifestTests.AssertNone(problems);
    }

    [Fact(Timeout = 120_000)]
    public async Task A_worker_loads_TorchSharp_with_the_system_libstdcxx()
    {
        int port;
        using (var listener = new TcpListener(IPAddress.Loopback, 0))
        {
            listener.Start();
            port = ((IPEndPoint)listener.LocalEndpoint).Port;
        }   // closed again: the worker finds nobody there and gives up after a second, having loaded torch first
        var (exit, log) = await RunWithLoaderLog("src/Worker", "worker", ["--coordinator", $"http://127.0.0.1:{port}", "--give-up-after", "1", "--threads", "1"], TimeSpan.FromSeconds(100));
        Assert.True(exit == 1 && log.Contains("giving up", StringComparison.Ordinal), $"expected the worker to give up on the closed port (exit 1), got exit {exit}:\n{Tail(log)}");
        AssertLoadedWithSystemLibStdCxx("src/Worker", log);
    }

    [Fact(Timeout = 300_000)]
    public async Task A_coordinator_trains_two_steps_with_the_system_libstdcxx()
    {
        var run = Path.Combine(Path.GetTempPath(), $"dd-native-{Guid.NewGuid():N}");
        try
        {
            var (exit, log) = await RunWithLoaderLog("src/Coordinator", "coordinator", ["train", "--recipe", "swissroll", "--steps", "2", "--threads", "1", "--out", run], TimeSpan.FromSeconds(280));
            Assert.True(exit == 0, $"coordinator train exited with {exit}:\n{Tail(log)}");
            Assert.True(Directory.Exists(Path.Combine(run, "checkpoints", "2")), $"no checkpoint of step 2 in {run}:\n{Tail(log)}");
            AssertLoadedWithSystemLibStdCxx("src/Coordinator", log);
        }
        finally
        {
            if (Directory.Exists(run)) Directory.Delete(run, recursive: true);
        }
    }

    /// <summary>Each check of <see cref="NativeLibraries.PatchProblems"/> really fails: the package's library changed in one way each.</summary>
    [Theory]
    [InlineData("unpatched", "is not weak")]
    [InlineData("another byte", "outside the flags")]
    [InlineData("another need weak", "flags changed")]
    [InlineData("shorter", "bytes long")]
    [InlineData("not elf", "not an ELF file")]
    public void The_patch_check_finds_a_wrong_output(string change, string expected)
    {
        var original = File.ReadAllBytes(NativeLibraries.CachedLibrary());
        var patched = (byte[])original.Clone();
        var needs = ElfVersions.Read(original).Needs;
        var target = needs.Single(n => n.File == LibStdCxx && n.Version == PatchedVersion);
        if (change != "unpatched") patched[target.FlagsOffset] |= (byte)ElfVersions.WeakFlag;
        switch (change)
        {
            case "another byte": patched[original.Length / 2] ^= 0x01; break;
            case "another need weak": patched[needs.First(n => n != target).FlagsOffset] |= (byte)ElfVersions.WeakFlag; break;
            case "shorter": Array.Resize(ref patched, patched.Length - 1); break;
            case "not elf": patched[1] = (byte)'X'; break;
        }
        var problems = NativeLibraries.PatchProblems(original, patched);
        Assert.Contains(problems, p => p.Contains(expected, StringComparison.Ordinal));
    }

    private void AssertLoadedWithSystemLibStdCxx(string project, string log)
    {
        var initialized = CallingInit().Matches(log).Select(m => m.Groups[1].Value.Trim()).ToList();
        var torchSharp = Path.GetFullPath(NativeLibraries.OutputLibrary(project));
        Assert.True(initialized.Contains(torchSharp), $"the loader never initialized {torchSharp} (LD_DEBUG=libs):\n{Tail(log)}");
        var libStdCxx = initialized.Where(p => Path.GetFileName(p) == LibStdCxx).ToList();
        Assert.True(libStdCxx.Count == 1, $"expected one {LibStdCxx} initialized, got: {string.Join(", ", libStdCxx)}");
        var directory = Path.GetDirectoryName(libStdCxx[0])!;
        Assert.True(NativeLibraries.SystemFolders.Contains(directory), $"{libStdCxx[0]} is not in a system library folder ({string.Join(", ", NativeLibraries.SystemFolders)})");
        var provides = ElfVersions.Read(libStdCxx[0]).Definitions.Contains(PatchedVersion);
        output.WriteLine($"{project}: {torchSharp} loaded with {libStdCxx[0]} ({(provides ? "which defines" : "which lacks")} {PatchedVersion})");
    }

    private static async Task<(int Exit, string Log)> RunWithLoaderLog(string project, string exe, string[] args, TimeSpan limit)
    {
        var path = Path.Combine(RepoFiles.Root, project, NativeLibraries.ConfigurationFolder, exe);
        Assert.True(File.Exists(path), $"{path} is missing: build the solution (scripts/setup.sh) first");
        var psi = new ProcessStartInfo(path) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args) psi.ArgumentList.Add(a);
        psi.Environment["LD_DEBUG"] = "libs";
        foreach (var v in (string[])["DISTDIFFUSION_TOKEN", "DISTDIFFUSION_WORKER_TOKEN", "DISTDIFFUSION_CLIENT_TOKEN", "LD_LIBRARY_PATH", "LD_PRELOAD"]) psi.Environment.Remove(v);
        using var p = Process.Start(psi) ?? throw new InvalidOperationException($"could not start {path}");
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        try
        {
            await p.WaitForExitAsync().WaitAsync(limit);
        }
        catch (TimeoutException)
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"{exe} {string.Join(' ', args)} did not finish in {limit.TotalSeconds:0} s:\n{Tail(await stdout + await stderr)}");
        }
        return (p.ExitCode, await stdout + "\n" + await stderr);
    }

    private static string Tail(string log) => string.Join('\n', log.Split('\n').Where(l => !l.Contains("trying file=", StringComparison.Ordinal)).TakeLast(40));

    private static string? Readelf(string path)
    {
        ProcessStartInfo psi = new("readelf") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in (string[])["-V", "-W", path]) psi.ArgumentList.Add(a);
        try
        {
            using var p = Process.Start(psi)!;
            var text = p.StandardOutput.ReadToEnd();
            p.WaitForExit();
            return p.ExitCode == 0 ? text : null;
        }
        catch (System.ComponentModel.Win32Exception)
        {
            return null;   // binutils is not installed (a pristine Debian root): our own reader's result stands alone
        }
    }

    [GeneratedRegex(@"calling init: (\S+)")]
    private static partial Regex CallingInit();
}

/// <summary>Where the build outputs, the NuGet cache and the system keep the native libraries, and the patch's rules.</summary>
internal static class NativeLibraries
{
    private const string PatchedVersion = "GLIBCXX_3.4.32";
    private const string NativeFile = "runtimes/linux-x64/native/libLibTorchSharp.so";

    /// <summary>The folders glibc's loader searches by default on Debian and Ubuntu (amd64).</summary>
    public static readonly IReadOnlyList<string> SystemFolders = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"];

    /// <summary>"bin/Release/net10.0": the test binaries' own place under their project, the same under every project.</summary>
    public static string ConfigurationFolder { get; } =
        Path.GetRelativePath(Path.Combine(RepoFiles.Root, "tests", "Deploy"), AppContext.BaseDirectory).TrimEnd(Path.DirectorySeparatorChar);

    public static string OutputLibrary(string project) => Path.Combine(RepoFiles.Root, project, ConfigurationFolder, NativeFile);

    /// <summary>TorchSharp's library in the NuGet package folder this project restored from (obj/project.assets.json).</summary>
    public static string CachedLibrary()
    {
        using var assets = JsonDocument.Parse(File.ReadAllText(RepoFiles.PathOf("tests/Deploy/obj/project.assets.json")));
        var folders = assets.RootElement.GetProperty("packageFolders").EnumerateObject().Select(f => f.Name).ToList();
        var package = assets.RootElement.GetProperty("libraries").EnumerateObject()
            .Single(l => l.Name.StartsWith("TorchSharp/", StringComparison.OrdinalIgnoreCase)).Value.GetProperty("path").GetString()!;
        return folders.Select(f => Path.Combine(f, package, NativeFile)).FirstOrDefault(File.Exists)
            ?? throw new FileNotFoundException($"{package}/{NativeFile} is in none of the package folders {string.Join(", ", folders)}");
    }

    /// <summary>The library of that file name in the first system folder that has it.</summary>
    public static string? SystemLibrary(string soname) => SystemFolders.Select(f => Path.Combine(f, soname)).FirstOrDefault(File.Exists);

    /// <summary>
    /// What is wrong with <paramref name="patched"/> as the build's copy of <paramref name="original"/>: it must have the
    /// same length, its GLIBCXX_3.4.32 need of libstdc++ must be weak (the original's not), every other need's flags
    /// unchanged, and no byte may differ outside that need's two flag bytes.
    /// </summary>
    public static List<string> PatchProblems(byte[] original, byte[] patched)
    {
        var problems = new List<string>();
        if (patched.Length != original.Length)
        {
            problems.Add($"the output is {patched.Length} bytes long, the package's file {original.Length}");
            return problems;
        }
        ElfVersions before, after;
        try
        {
            before = ElfVersions.Read(original);
            after = ElfVersions.Read(patched);
        }
        catch (InvalidDataException e)
        {
            problems.Add(e.Message);
            return problems;
        }
        var target = before.Needs.SingleOrDefault(n => n.File == "libstdc++.so.6" && n.Version == PatchedVersion);
        if (target is null)
        {
            problems.Add($"the package's file has no {PatchedVersion} need of libstdc++.so.6 (another TorchSharp build?)");
            return problems;
        }
        if (target.Weak) problems.Add($"the package's own {PatchedVersion} need is already weak");
        if (after.Needs.Count != before.Needs.Count)
            problems.Add($"the output has {after.Needs.Count} version needs, the package's file {before.Needs.Count}");
        foreach (var (b, a) in before.Needs.Zip(after.Needs))
        {
            if (b == target)
            {
                if (!a.Weak) problems.Add($"{a.File} {a.Version} is not weak in the output (flags 0x{a.Flags:x})");
                else if (a.Flags != (b.Flags | ElfVersions.WeakFlag)) problems.Add($"{a.File} {a.Version}: flags 0x{a.Flags:x}, expected 0x{b.Flags | ElfVersions.WeakFlag:x}");
            }
            else if (a.Flags != b.Flags || a.Version != b.Version || a.File != b.File)
                problems.Add($"{b.File} {b.Version}: flags changed from 0x{b.Flags:x} to 0x{a.Flags:x} ({a.File} {a.Version})");
        }
        var outside = Enumerable.Range(0, original.Length)
            .Where(i => original[i] != patched[i] && (i < target.FlagsOffset || i >= target.FlagsOffset + 2)).Take(5).ToList();
        if (outside.Count > 0) problems.Add($"bytes outside the flags of {PatchedVersion} (at {target.FlagsOffset}) differ, first at {string.Join(", ", outside)}");
        return problems;
    }
}
