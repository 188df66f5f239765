using System.Text.RegularExpressions;
using k8s.Models;

namespace DistDiffusion.Tests.Deploy;

/// <summary>An image reference of the project's image: repository, tag, and the variant the tag ends in (-cpu, -cuda).</summary>
internal sealed record ImageRef(string Repository, string Tag, string Variant);

/// <summary>A container that runs one of the project's executables, with its parsed command line.</summary>
internal sealed record AppContainer(ContainerInPod Container, string Exe, CliInvocation Invocation, ImageRef Image)
{
    /// <summary>
    /// The coordinator URL it dials (worker --coordinator, client verbs --address), if any: read from the arguments as
    /// written, so the network checks see the dialer even where the flag itself fails to parse (reported separately).
    /// </summary>
    public string? CoordinatorUrl
    {
        get
        {
            var args = Invocation.Args;
            for (var i = 0; i < args.Count; i++)
            {
                if (args[i] is "--coordinator" or "--address" && i + 1 < args.Count) return args[i + 1];
                if (args[i].StartsWith("--coordinator=", StringComparison.Ordinal) || args[i].StartsWith("--address=", StringComparison.Ordinal)) return args[i][(args[i].IndexOf('=', StringComparison.Ordinal) + 1)..];
            }
            return null;
        }
    }

    public override string ToString() => $"{Container} ({Invocation.Verb})";
}

/// <summary>
/// Finds the containers of the manifests that run /app/coordinator or /app/worker and parses their arguments with
/// the real command lines; every container's image must be a variant of the one image the Dockerfile builds.
/// </summary>
internal sealed partial class AppContainers
{
    private AppContainers(IReadOnlyList<AppContainer> all, IReadOnlyList<string> problems)
    {
        All = all;
        Problems = problems;
    }

    public IReadOnlyList<AppContainer> All { get; }
    /// <summary>Commands naming no executable, arguments that do not parse, images that are not a pinned variant.</summary>
    public IReadOnlyList<string> Problems { get; }

    [GeneratedRegex(@"^(?<repo>[a-z0-9][a-z0-9._/-]*(:\d+/[a-z0-9._/-]+)?):(?<tag>[A-Za-z0-9_][A-Za-z0-9_.-]*)-(?<variant>[a-z0-9]+)$")]
    private static partial Regex VariantImage();

    public static AppContainers Of(ManifestSet set, DeployFacts facts, DockerfileFacts docker)
    {
        var p = new List<string>();
        var all = new List<AppContainer>();
        var images = new List<ImageRef>();
        foreach (var c in set.Containers())
        {
            var m = VariantImage().Match(c.Container.Image ?? "");
            ImageRef? image = null;
            if (!m.Success || !facts.TorchDevices.Contains(m.Groups["variant"].Value))
                p.Add($"{c}: image {c.Container.Image} is not <repository>:<version>-<variant> with a variant of {string.Join("/", facts.TorchDevices)} (one of the images deploy/docker/Dockerfile builds)");
            else if (m.Groups["tag"].Value == "latest")
                p.Add($"{c}: image {c.Container.Image} is not pinned to a version");
            else
            {
                image = new ImageRef(m.Groups["repo"].Value, m.Groups["tag"].Value, m.Groups["variant"].Value);
                images.Add(image);
            }
            // The command is always explicit: no container depends on which executable the image's ENTRYPOINT names.
            var command = c.Container.Command ?? [];
            if (command.Count == 0)
            {
                p.Add($"{c}: no command (name the executable, e.g. {docker.AppDir}/{facts.CoordinatorExe})");
                continue;
            }
            if (!command[0].StartsWith(docker.AppDir + "/", StringComparison.Ordinal)) continue;   // a plain tool of the base image (sleep)
            var exe = command[0][(docker.AppDir.Length + 1)..];
            if (!facts.Executables.Contains(exe))
            {
                p.Add($"{c}: command {command[0]}: {exe} is none of the executables the image holds ({string.Join(", ", facts.Executables)})");
                continue;
            }
            DockerfileChecks.CheckExecutableBuilt(exe, $"{c}: command {command[0]}", p);
            var args = command.Skip(1).Concat(c.Container.Args ?? []).ToList();
            if (args.Any(a => a.Contains("$(", StringComparison.Ordinal))) p.Add($"{c}: arguments use $(VAR) expansion; these checks need literal arguments");
            var inv = CliInvocation.Parse(facts, exe, args, c.ToString(), p);
            if (image is not null) all.Add(new AppContainer(c, exe, inv, image));
        }
        if (images.Select(i => (i.Repository, i.Tag)).Distinct().Count() > 1)
            p.Add($"the manifests use images of different builds: {string.Join(", ", images.Select(i => $"{i.Repository}:{i.Tag}-{i.Variant}").Distinct())}");
        return new AppContainers(all, p);
    }

    public bool IsApp(PodTemplate pod, V1Container c) => All.Any(a => a.Container.Pod == pod && a.Container.Container == c);

    public IEnumerable<AppContainer> Running(string exe, string? verb = null) =>
        All.Where(a => a.Exe == exe && (verb is null ? a.Invocation.Command is System.CommandLine.RootCommand : a.Invocation.Command.Name == verb));

    /// <summary>The mount a path lies in (the deepest mountPath above it), or null.</summary>
    public static V1VolumeMount? MountFor(ContainerInPod c, string path) =>
        (c.Container.VolumeMounts ?? [])
            .Where(m => path == m.MountPath || path.StartsWith(m.MountPath.TrimEnd('/') + "/", StringComparison.Ordinal))
            .OrderByDescending(m => m.MountPath.Length)
            .FirstOrDefault();

    /// <summary>The pod volume behind a mount.</summary>
    public static V1Volume? VolumeOf(ContainerInPod c, V1VolumeMount m) => (c.Pod.Spec.Volumes ?? []).FirstOrDefault(v => v.Name == m.Name);
}
