using System.Text.RegularExpressions;

namespace DistDiffusion.Tests.Deploy;

/// <summary>What the manifests need to know of the image: where the executables are, the uid it runs as, its working directory.</summary>
internal sealed record DockerfileFacts(string AppDir, long? Uid, string WorkDir, IReadOnlyList<string> EntryPoint, IReadOnlyList<string> Variants)
{
    public static DockerfileFacts Empty { get; } = new("/app", null, "/", [], []);
}

/// <summary>
/// Offline checks of deploy/docker/Dockerfile and .dockerignore: an SDK build stage that restores and publishes the
/// coordinator (with the worker beside it) with the TorchDevice switch, one runtime stage per TorchDevice value that
/// is not an SDK image and has the ASP.NET Core shared framework on an Ubuntu 24.04 base, pinned base tags, a numeric
/// non-root USER, EXPOSE of the coordinator's port, and an ENTRYPOINT naming an executable of this build.
/// </summary>
internal static partial class DockerfileChecks
{
    public const string DeviceArg = "TORCH_DEVICE";
    private const string SdkImage = "mcr.microsoft.com/dotnet/sdk";
    private const string AspNetImage = "mcr.microsoft.com/dotnet/aspnet";
    private const string CudaImage = "nvidia/cuda";

    public static (DockerfileFacts Facts, List<string> Problems) FromRepo() =>
        Check(RepoFiles.Read(RepoFiles.Dockerfile), File.Exists(RepoFiles.PathOf(RepoFiles.DockerIgnore)) ? RepoFiles.Read(RepoFiles.DockerIgnore) : null, DeployFacts.Current);

    public static (DockerfileFacts Facts, List<string> Problems) Check(string dockerfile, string? dockerignore, DeployFacts facts)
    {
        var p = new List<string>();
        DockerfileModel m;
        try
        {
            m = DockerfileModel.Parse(dockerfile);
        }
        catch (FormatException e)
        {
            p.Add($"Dockerfile: {e.Message}");
            return (DockerfileFacts.Empty, p);
        }

        if (!m.GlobalArgs.TryGetValue(DeviceArg, out var defaultDevice))
            p.Add($"no global ARG {DeviceArg} (declared before the first FROM, so FROM lines can use it)");
        else if (defaultDevice != facts.DefaultTorchDevice)
            p.Add($"ARG {DeviceArg} defaults to '{defaultDevice}', but Directory.Build.props defaults TorchDevice to '{facts.DefaultTorchDevice}'");

        // Every external base is pinned (stages built on an earlier stage, or on a variable, are checked through the variants below).
        foreach (var s in m.Stages.Where(s => !m.Stages.Any(o => o.Index < s.Index && string.Equals(o.Name, s.Base, StringComparison.OrdinalIgnoreCase)) && !s.BaseAsWritten.Contains('$', StringComparison.Ordinal)))
            CheckPinned(s.Base, $"stage {s.Name ?? s.Index.ToString(System.Globalization.CultureInfo.InvariantCulture)}", p);

        var (publishDir, copiedSources) = CheckBuildStage(m, facts, p);
        var ignore = dockerignore is null ? null : DockerIgnore.Parse(dockerignore);
        if (ignore is null) p.Add($"no {RepoFiles.DockerIgnore} at the repository root (the build context)");
        else CheckDockerIgnore(ignore, copiedSources, p);

        var final = m.Stages[^1];
        string? appDir = null;
        long? uid = null;
        IReadOnlyList<string> entry = [];
        var variants = new List<string>();
        foreach (var device in facts.TorchDevices)
        {
            var chain = Chain(m, final, new Dictionary<string, string?> { [DeviceArg] = device }, p, $"{DeviceArg}={device}");
            if (chain is null) continue;
            variants.Add(device);
            var (stages, external) = chain.Value;
            CheckRuntime(m, device, stages, external, publishDir, p);
            var copyApp = stages.SelectMany(s => s.All("COPY")).LastOrDefault(c => c.Flags.TryGetValue("from", out var f) && IsStage(m, f, "build"));
            if (copyApp is null) p.Add($"{DeviceArg}={device}: the runtime stages copy nothing from the build stage");
            else appDir ??= copyApp.Words[^1].TrimEnd('/');
            var user = stages.SelectMany(s => s.All("USER")).LastOrDefault();
            uid ??= CheckUser(user, device, p);
            var expose = stages.SelectMany(s => s.All("EXPOSE")).SelectMany(e => e.Words).Select(w => w.Split('/')[0]).ToList();
            if (!expose.Contains(facts.DefaultPort.ToString(System.Globalization.CultureInfo.InvariantCulture)))
                p.Add($"{DeviceArg}={device}: the image does not EXPOSE the coordinator's port {facts.DefaultPort} (Names.DefaultPort)");
            var ep = stages.SelectMany(s => s.All("ENTRYPOINT")).LastOrDefault();
            if (ep?.ExecForm is not { Count: > 0 } form) p.Add($"{DeviceArg}={device}: no ENTRYPOINT in exec (JSON) form");
            else if (entry.Count == 0) entry = form;
        }

        appDir ??= "/app";
        if (entry.Count > 0)
        {
            var exe = entry[0];
            if (!exe.StartsWith(appDir + "/", StringComparison.Ordinal)) p.Add($"ENTRYPOINT {exe} is not in the application folder {appDir}");
            var name = exe[(exe.LastIndexOf('/') + 1)..];
            if (!facts.Executables.Contains(name)) p.Add($"ENTRYPOINT {exe}: {name} is none of the executables ({string.Join(", ", facts.Executables)})");
            CheckExecutableBuilt(name, $"ENTRYPOINT {exe}", p);
        }
        var workDir = final.All("WORKDIR").LastOrDefault()?.Arguments.Trim() ?? "/";
        return (new DockerfileFacts(appDir, uid, workDir, entry, variants), p.Distinct().ToList());
    }

    /// <summary>The executable's apphost and runtimeconfig exist in this build's output (the test project references both programs).</summary>
    public static void CheckExecutableBuilt(string name, string where, List<string> p)
    {
        foreach (var file in new[] { name, name + ".runtimeconfig.json", name + ".dll" })
            if (!File.Exists(Path.Combine(AppContext.BaseDirectory, file))) p.Add($"{where}: the build output has no {file}");
    }

    private static (string? PublishDir, List<string> Copied) CheckBuildStage(DockerfileModel m, DeployFacts facts, List<string> p)
    {
        var copied = new List<string>();
        var build = m.Stage("build");
        if (build is null || !IsImage(build.Base, SdkImage))
        {
            p.Add($"no stage named build FROM the .NET SDK image ({SdkImage})");
            return (null, copied);
        }
        if (!build.All("ARG").Any(a => a.Arguments.Split('=')[0].Trim() == DeviceArg))
            p.Add($"the build stage does not declare ARG {DeviceArg}: a global ARG is not visible inside a stage");
        var runs = build.All("RUN").ToList();
        var restore = runs.FirstOrDefault(r => r.Arguments.Contains("dotnet restore", StringComparison.Ordinal));
        var publish = runs.FirstOrDefault(r => r.Arguments.Contains("dotnet publish", StringComparison.Ordinal));
        string? publishDir = null;
        foreach (var (verb, run) in new[] { ("restore", restore), ("publish", publish) })
        {
            if (run is null)
            {
                p.Add($"the build stage does not run dotnet {verb}");
                continue;
            }
            if (!DeviceSwitch().IsMatch(run.Arguments)) p.Add($"dotnet {verb} does not pass -p:TorchDevice=${{{DeviceArg}}} (the CUDA variant would get libtorch CPU)");
            if (!run.Arguments.Contains(facts.CoordinatorProject, StringComparison.Ordinal)) p.Add($"dotnet {verb} does not name {facts.CoordinatorProject}");
        }
        if (publish is not null)
        {
            if (!Regex.IsMatch(publish.Arguments, @"(-c|--configuration)\s+Release\b")) p.Add("dotnet publish does not build the Release configuration");
            var o = Regex.Match(publish.Arguments, @"(?:-o|--output)\s+(\S+)");
            if (!o.Success) p.Add("dotnet publish has no -o folder");
            else publishDir = o.Groups[1].Value.TrimEnd('/');
            if (publish.Arguments.Contains("--self-contained", StringComparison.Ordinal)) p.Add("dotnet publish is self-contained: the runtime image already has the framework");
        }
        // What the restore and the publish need must be copied in before them.
        var beforeRestore = new List<string>();
        var beforePublish = new List<string>();
        foreach (var ins in build.Instructions)
        {
            if (ins == restore) beforeRestore.AddRange(copied);
            if (ins == publish) beforePublish.AddRange(copied);
            if (ins.Keyword is "COPY" or "ADD" && !ins.Flags.ContainsKey("from"))
            {
                var dest = ins.Words[^1];
                foreach (var src in ins.Words.Take(ins.Words.Count - 1))
                {
                    var path = src.TrimEnd('/');
                    copied.Add(path);
                    if (path.Contains('*', StringComparison.Ordinal) || path.Contains('?', StringComparison.Ordinal)) continue;
                    if (!File.Exists(RepoFiles.PathOf(path)) && !Directory.Exists(RepoFiles.PathOf(path))) p.Add($"line {ins.Line}: COPY {src}: no such file or folder in the repository");
                    // A file copied into a folder keeps its relative place (src/X/X.csproj -> src/X/), as the project references expect.
                    if (File.Exists(RepoFiles.PathOf(path)) && path.Contains('/', StringComparison.Ordinal) && dest.TrimEnd('/') != path[..path.LastIndexOf('/')])
                        p.Add($"line {ins.Line}: COPY {src} {dest}: the file does not land at its repository path");
                }
            }
        }
        bool Has(List<string> list, string path) => list.Any(c => c == path || path.StartsWith(c + "/", StringComparison.Ordinal) || c == ".");
        if (restore is not null)
            foreach (var need in facts.CoordinatorProjectClosure.Append("Directory.Build.props").Append("Directory.Packages.props"))
                if (!Has(beforeRestore, need)) p.Add($"{need} is not copied before dotnet restore (the restore would miss it)");
        if (publish is not null)
            foreach (var need in facts.CoordinatorProjectClosure.Select(c => c[..c.LastIndexOf('/')]).Append("protos"))
                if (!Has(beforePublish, need)) p.Add($"{need}/ is not copied before dotnet publish");
        return (publishDir, copied);
    }

    [GeneratedRegex(@"-p:TorchDevice=(\$\{TORCH_DEVICE\}|\$TORCH_DEVICE)(\s|$)")]
    private static partial Regex DeviceSwitch();

    /// <summary>The stages from <paramref name="start"/> down to the external image it is built on, with the given ARG values.</summary>
    private static (List<DockerStage> Stages, string External)? Chain(DockerfileModel m, DockerStage start, Dictionary<string, string?> args, List<string> p, string where)
    {
        var stages = new List<DockerStage>();
        var current = start;
        while (true)
        {
            stages.Insert(0, current);
            var values = m.GlobalArgs.ToDictionary(kv => kv.Key, kv => kv.Value);
            foreach (var (k, v) in args) values[k] = v;
            var baseName = DockerfileModel.Substitute(current.BaseAsWritten, values);
            var next = m.Stages.FirstOrDefault(s => s.Index < current.Index && string.Equals(s.Name, baseName, StringComparison.OrdinalIgnoreCase));
            if (next is null)
            {
                if (baseName.Contains('$', StringComparison.Ordinal) || !baseName.Contains('/', StringComparison.Ordinal) && !baseName.Contains(':', StringComparison.Ordinal))
                {
                    p.Add($"{where}: FROM {current.BaseAsWritten} names no earlier stage ('{baseName}')");
                    return null;
                }
                return (stages, baseName);
            }
            current = next;
        }
    }

    private static void CheckRuntime(DockerfileModel m, string device, List<DockerStage> stages, string external, string? publishDir, List<string> p)
    {
        var where = $"{DeviceArg}={device}";
        if (IsImage(external, SdkImage) || stages.Any(s => s.Name == "build")) p.Add($"{where}: the runtime image is built on the SDK image");
        CheckPinned(external, where, p);
        // TorchSharp's native library needs glibc >= 2.38 and GLIBCXX_3.4.32: Ubuntu 24.04 has 2.39 and 3.4.33.
        if (!external.Contains("noble", StringComparison.Ordinal) && !external.Contains("ubuntu24.04", StringComparison.Ordinal))
            p.Add($"{where}: runtime base {external} is not Ubuntu 24.04 (noble): TorchSharp needs glibc >= 2.38 and GLIBCXX_3.4.32");
        if (device == "cuda" && !IsImage(external, CudaImage)) p.Add($"{where}: the CUDA variant is not built on an {CudaImage} image");
        if (device != "cuda" && IsImage(external, CudaImage)) p.Add($"{where}: a {device} variant on a CUDA image");
        var hasFramework = IsImage(external, AspNetImage) || stages.SelectMany(s => s.All("COPY")).Any(c =>
            c.Flags.TryGetValue("from", out var from) && c.Words.Count >= 2 && c.Words[0].TrimEnd('/') == "/usr/share/dotnet"
            && (IsImage(from, AspNetImage) || (m.Stage(from) is { } st && IsImage(st.Base, AspNetImage))));
        if (!hasFramework) p.Add($"{where}: the runtime has no ASP.NET Core shared framework (from {AspNetImage}): both executables need it");
        foreach (var s in stages)
        {
            foreach (var run in s.All("RUN"))
                if (Regex.IsMatch(run.Arguments, @"\bdotnet\s+(build|publish|restore)\b")) p.Add($"{where}: stage {s.Name ?? s.Base} builds code: the runtime image must hold no SDK");
            foreach (var copy in s.All("COPY"))
            {
                if (!copy.Flags.TryGetValue("from", out var from)) continue;
                if (m.Stage(from) is null) CheckPinned(from, $"{where}: COPY --from", p);
                if (IsStage(m, from, "build") && publishDir is not null && copy.Words.Take(copy.Words.Count - 1).Any(src => src.TrimEnd('/') != publishDir))
                    p.Add($"{where}: COPY --from=build copies more than the publish folder {publishDir}");
                if (m.Stage(from) is { } st && IsImage(st.Base, SdkImage) && !IsStage(m, from, "build")) p.Add($"{where}: copies from an SDK stage");
            }
        }
    }

    private static long? CheckUser(DockerInstruction? user, string device, List<string> p)
    {
        if (user is null)
        {
            p.Add($"{DeviceArg}={device}: no USER: the image would run as root");
            return null;
        }
        var parts = user.Arguments.Trim().Split(':');
        if (!long.TryParse(parts[0], out var uid)) p.Add($"USER {user.Arguments}: not numeric, so Kubernetes' runAsNonRoot cannot verify it");
        else if (uid == 0) p.Add("USER 0 is root");
        if (parts.Length > 1 && (!long.TryParse(parts[1], out var gid) || gid == 0)) p.Add($"USER {user.Arguments}: the group is not a non-zero number");
        return long.TryParse(parts[0], out var u) && u != 0 ? u : null;
    }

    private static void CheckPinned(string image, string where, List<string> p)
    {
        if (image.Contains('@', StringComparison.Ordinal)) return;   // pinned by digest
        var slash = image.LastIndexOf('/');
        var colon = image.LastIndexOf(':');
        if (colon <= slash)
        {
            p.Add($"{where}: image {image} has no tag (that means latest)");
            return;
        }
        var tag = image[(colon + 1)..];
        if (tag == "latest" || !Regex.IsMatch(tag, @"^\d+\.\d+\.\d+")) p.Add($"{where}: image {image} is not pinned to a full version tag");
    }

    private static bool IsImage(string reference, string repository) => reference.StartsWith(repository + ":", StringComparison.Ordinal) || reference.StartsWith(repository + "@", StringComparison.Ordinal);

    private static bool IsStage(DockerfileModel m, string from, string name) => m.Stage(from) is { } s && string.Equals(s.Name, name, StringComparison.OrdinalIgnoreCase);

    private static void CheckDockerIgnore(DockerIgnore ignore, List<string> copied, List<string> p)
    {
        foreach (var path in new[] { ".git", "src/Model/bin", "src/Coordinator/obj", "tests/bin", "runs", "data" })
            if (!ignore.Excludes(path)) p.Add($"{RepoFiles.DockerIgnore} does not exclude {path}");
        foreach (var path in copied.Where(c => !c.Contains('*', StringComparison.Ordinal)))
        {
            if (ignore.Excludes(path)) p.Add($"{RepoFiles.DockerIgnore} excludes {path}, which the Dockerfile copies");
            var full = RepoFiles.PathOf(path);
            if (!Directory.Exists(full)) continue;
            // One real source file under each copied folder must survive (an over-broad pattern would drop them).
            var sample = Directory.EnumerateFiles(full, "*", SearchOption.AllDirectories)
                .Select(f => Path.GetRelativePath(RepoFiles.Root, f).Replace(Path.DirectorySeparatorChar, '/'))
                .FirstOrDefault(f => f.EndsWith(".cs", StringComparison.Ordinal) || f.EndsWith(".proto", StringComparison.Ordinal));
            if (sample is not null && ignore.Excludes(sample)) p.Add($"{RepoFiles.DockerIgnore} excludes {sample}, which the build needs");
        }
    }
}

/// <summary>.dockerignore patterns (Go filepath.Match syntax plus **, ! exceptions; the last matching pattern wins).</summary>
internal sealed class DockerIgnore
{
    private readonly List<(Regex Pattern, bool Exclude)> _rules;

    private DockerIgnore(List<(Regex, bool)> rules) => _rules = rules;

    public static DockerIgnore Parse(string text)
    {
        var rules = new List<(Regex, bool)>();
        foreach (var raw in text.Split('\n'))
        {
            var line = raw.Trim();
            if (line.Length == 0 || line.StartsWith('#')) continue;
            var exclude = !line.StartsWith('!');
            var pattern = (exclude ? line : line[1..]).Trim().Trim('/');
            if (pattern.StartsWith("./", StringComparison.Ordinal)) pattern = pattern[2..];
            var rx = "^" + Regex.Escape(pattern)
                .Replace(@"\*\*/", "(.*/)?", StringComparison.Ordinal)
                .Replace(@"\*\*", ".*", StringComparison.Ordinal)
                .Replace(@"\*", "[^/]*", StringComparison.Ordinal)
                .Replace(@"\?", "[^/]", StringComparison.Ordinal) + "$";
            rules.Add((new Regex(rx), exclude));
        }
        return new DockerIgnore(rules);
    }

    /// <summary>Whether the path (relative to the context, '/'-separated) or a folder above it is excluded.</summary>
    public bool Excludes(string path)
    {
        var parts = path.Trim('/').Split('/');
        var excluded = false;
        for (var n = 1; n <= parts.Length && !excluded; n++)
        {
            var prefix = string.Join('/', parts.Take(n));
            var state = false;
            foreach (var (pattern, exclude) in _rules)
                if (pattern.IsMatch(prefix)) state = exclude;
            excluded = state;
        }
        return excluded;
    }
}
