using DistDiffusion.Fuzz.Targets;

namespace DistDiffusion.Fuzz;

/// <summary>
/// <c>DistDiffusion.Fuzz TARGET</c>: one target under afl-fuzz (SharpFuzz's persistent loop; run once on standard input
/// outside AFL). <c>replay TARGET PATH...</c>: files, or every file of folders, through the target in this process; exit 1
/// on the first crash. <c>seeds TARGET FOLDER</c>: writes the target's seed inputs. <c>list</c>: the targets' names.
/// </summary>
internal static class Program
{
    private static int Main(string[] args)
    {
        try
        {
            return args switch
            {
                ["list"] => List(),
                ["seeds", var name, var folder] => WriteSeeds(name, folder),
                ["replay", var name, .. var paths] => Replay(name, paths),
                [var name] when AllTargets.Names.Contains(name) => Fuzz(name),
                _ => Usage(),
            };
        }
        finally
        {
            FuzzTarget.CleanScratch();
        }
    }

    private static int Usage()
    {
        Console.Error.WriteLine($"usage: DistDiffusion.Fuzz TARGET | replay TARGET PATH... | seeds TARGET FOLDER | list\ntargets: {string.Join(", ", AllTargets.Names)}");
        return 2;
    }

    private static int List()
    {
        foreach (var name in AllTargets.Names) Console.WriteLine(name);
        return 0;
    }

    private static int Fuzz(string name)
    {
        // Nothing instrumented may run before SharpFuzz sets up the coverage map: what a target reuses (a coordinator)
        // starts with the first input.
        var target = AllTargets.Create(name);
        // An exception on another thread (the coordinator's) ends the process, which afl-fuzz sees only as a lost fork
        // server: say what it was where FUZZ_DEATH_LOG points.
        if (Environment.GetEnvironmentVariable("FUZZ_DEATH_LOG") is { Length: > 0 } deathLog)
            AppDomain.CurrentDomain.UnhandledException += (_, e) => File.AppendAllText(deathLog, $"{DateTime.UtcNow:O} {name}: {e.ExceptionObject}\n");
        SharpFuzz.Fuzzer.Run(stream =>
        {
            using var ms = new MemoryStream();
            stream.CopyTo(ms);
            target.Execute(ms.ToArray());
        });
        Environment.Exit(0);
        return 0;
    }

    private static int WriteSeeds(string name, string folder)
    {
        Directory.CreateDirectory(folder);
        var count = 0;
        foreach (var (seed, bytes) in AllTargets.Create(name).Seeds())
        {
            File.WriteAllBytes(Path.Combine(folder, "seed-" + seed), bytes);
            count++;
        }
        Console.WriteLine($"{name}: {count} seeds in {folder}");
        Environment.Exit(0);
        return 0;
    }

    private static int Replay(string name, string[] paths)
    {
        var target = AllTargets.Create(name);
        var files = paths.SelectMany(p => Directory.Exists(p) ? Directory.EnumerateFiles(p, "*", SearchOption.AllDirectories).Order(StringComparer.Ordinal) : (IEnumerable<string>)[p]).ToList();
        var clock = System.Diagnostics.Stopwatch.StartNew();
        foreach (var file in files)
        {
            try
            {
                target.Execute(File.ReadAllBytes(file));
                if (Environment.GetEnvironmentVariable("DD_FUZZ_VERBOSE") == "1") Console.WriteLine($"{Path.GetFileName(file)}: {target.LastOutcome}");
            }
#pragma warning disable CA1031 // a crash of any type is reported, with its file
            catch (Exception e)
#pragma warning restore CA1031
            {
                Console.Error.WriteLine($"{name}: CRASH on {file}:\n{e}");
                Environment.Exit(1);
            }
        }
        Console.WriteLine($"{name}: {files.Count} inputs replayed without a crash in {clock.Elapsed.TotalSeconds:F1} s");
        Environment.Exit(0);
        return 0;
    }
}
