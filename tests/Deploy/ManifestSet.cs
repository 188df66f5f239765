using k8s.Models;
using k8s;

namespace DistDiffusion.Tests.Deploy;

/// <summary>One object of a manifest file, deserialized into the KubernetesClient model class its apiVersion and kind name.</summary>
internal sealed record ManifestObject(string File, int Index, IKubernetesObject<V1ObjectMeta> Object)
{
    public string Kind => Object.Kind;
    public V1ObjectMeta Metadata => Object.Metadata;
    public string Name => Metadata?.Name ?? Metadata?.GenerateName ?? "(unnamed)";
    public override string ToString() => $"{File}: {Kind} {Name}";
}

/// <summary>A pod template (of a Deployment or Job) or a bare Pod: where it is, its labels and its spec.</summary>
internal sealed record PodTemplate(ManifestObject Owner, IDictionary<string, string> Labels, V1PodSpec Spec, IDictionary<string, string>? PodAnnotations = null)
{
    public IDictionary<string, string> Annotations => PodAnnotations ?? new Dictionary<string, string>();

    public override string ToString() => Owner.ToString();
}

/// <summary>A container with the pod it runs in.</summary>
internal sealed record ContainerInPod(PodTemplate Pod, V1Container Container)
{
    public override string ToString() => $"{Pod} container {Container.Name}";
}

/// <summary>Which run a rendered set is for.</summary>
internal enum DeployMode
{
    /// <summary>A training run: the coordinator and its workers as Jobs that complete with the run.</summary>
    Training,
    /// <summary>Serving samples from a finished run: a sample-only coordinator and sampling workers as Deployments.</summary>
    Serving,
}

/// <summary>Where the workers run.</summary>
internal enum WorkerPool
{
    Gpu,
    Cpu,
}

/// <summary>
/// A kustomization a user applies with `kubectl apply -k`, what it is for, and the one-off kustomizations (deploy/k8s/jobs)
/// that go with it: their objects reference its Service, claims and Secrets, so they are checked together.
/// </summary>
internal sealed record DeployTarget(string Name, string Dir, DeployMode Mode, WorkerPool Pool)
{
    public const string DownloadJob = "deploy/k8s/jobs/download-mnist";
    public const string SampleJob = "deploy/k8s/jobs/sample";
    public const string SamplesReader = "deploy/k8s/jobs/samples-reader";

    public static readonly DeployTarget Gpu = new("gpu", RepoFiles.ManifestFolder, DeployMode.Training, WorkerPool.Gpu);
    public static readonly DeployTarget Cpu = new("cpu", "deploy/k8s/overlays/cpu", DeployMode.Training, WorkerPool.Cpu);
    public static readonly DeployTarget GpuServing = new("gpu-serving", "deploy/k8s/serving", DeployMode.Serving, WorkerPool.Gpu);
    public static readonly DeployTarget CpuServing = new("cpu-serving", "deploy/k8s/overlays/cpu-serving", DeployMode.Serving, WorkerPool.Cpu);

    public static IReadOnlyList<DeployTarget> All { get; } = [Gpu, Cpu, GpuServing, CpuServing];

    /// <summary>Kustomizations that only point at a target's and must render exactly what it renders.</summary>
    public static IReadOnlyList<(string Dir, DeployTarget Target)> Aliases { get; } =
        [("deploy/k8s/overlays/gpu", Gpu), ("deploy/k8s/overlays/gpu-serving", GpuServing)];

    /// <summary>The kustomizations every target builds on, checked in each target's render: the base (never applied alone)
    /// and the setup it includes (applied alone once, before the first run).</summary>
    public static IReadOnlyList<string> Bases { get; } = ["deploy/k8s/base", Setup];

    public const string Setup = "deploy/k8s/setup";
    public const string CpuSetup = "deploy/k8s/overlays/cpu-setup";

    /// <summary>
    /// The setups a user applies before the first run, and the targets applied over them later: each object a setup
    /// renders must be the very object those render (a claim's access modes cannot change once it exists).
    /// </summary>
    public static IReadOnlyList<(string Dir, DeployTarget[] Targets)> Setups { get; } = [(Setup, [Gpu, GpuServing]), (CpuSetup, [Cpu, CpuServing])];

    public static DeployTarget Named(string name) =>
        All.FirstOrDefault(t => t.Name == name) ?? throw new ArgumentException($"no deploy target {name} (one of {string.Join(", ", All.Select(t => t.Name))})");

    /// <summary>The one-off kustomizations checked with it: the dataset download only goes with training.</summary>
    public IReadOnlyList<string> Jobs => Mode == DeployMode.Training ? [DownloadJob, SampleJob, SamplesReader] : [SampleJob, SamplesReader];

    public IReadOnlyList<string> Dirs => [Dir, .. Jobs];

    public override string ToString() => Name;
}

/// <summary>
/// One deployment as kustomize renders it (a <see cref="DeployTarget"/>'s kustomization and its one-off Jobs, each through
/// `kubectl kustomize`), loaded as typed Kubernetes objects. Deserialization is strict: a field the API does not have (a
/// typo, a wrong nesting level), a value of the wrong type, or an apiVersion/kind pair the API does not serve is a load
/// problem, as it would be for `kubectl apply` with server-side field validation. A kustomization kustomize cannot build
/// is one too. Each object's <see cref="ManifestObject.File"/> is the kustomization that rendered it.
/// </summary>
internal sealed class ManifestSet
{
    private ManifestSet(DeployTarget? target, IReadOnlyList<(string Path, string Text)> files, IReadOnlyList<ManifestObject> objects, IReadOnlyList<string> loadProblems)
    {
        Target = target;
        Files = files;
        Objects = objects;
        LoadProblems = loadProblems;
    }

    /// <summary>What the set was rendered for (null: loaded from YAML text by a test).</summary>
    public DeployTarget? Target { get; }
    public IReadOnlyList<(string Path, string Text)> Files { get; }
    public IReadOnlyList<ManifestObject> Objects { get; }
    public IReadOnlyList<string> LoadProblems { get; }

    public DeployMode Mode => Target?.Mode ?? DeployMode.Training;
    public WorkerPool Pool => Target?.Pool ?? WorkerPool.Gpu;

    /// <summary>The repository's rendering of a target.</summary>
    public static ManifestSet FromRepo(DeployTarget target) => Render(target, RepoFiles.Root, _ => false);

    /// <summary>Every target of the repository, each rendered.</summary>
    public static IReadOnlyList<ManifestSet> AllFromRepo() => DeployTarget.All.Select(FromRepo).ToList();

    /// <summary>
    /// A target rendered from a copy of deploy/k8s with one textual change in one file (for tests showing that a check
    /// fails). <paramref name="file"/> is relative to deploy/k8s.
    /// </summary>
    public static ManifestSet FromRepoWith(DeployTarget target, string file, string oldText, string newText)
    {
        using var copy = RepoCopy.WithChange(file, oldText, newText);
        // Kustomizations that do not read the changed file render as the repository's do.
        return Render(target, copy.Root, dir => copy.Affects(dir));
    }

    private static ManifestSet Render(DeployTarget target, string root, Func<string, bool> fromRoot)
    {
        var files = new List<(string, string)>();
        var problems = new List<string>();
        foreach (var dir in target.Dirs)
        {
            var r = Kustomize.Render(fromRoot(dir) ? root : RepoFiles.Root, dir);
            if (r.Yaml is null) problems.Add($"{dir}: {r.Error}");
            else files.Add((dir, r.Yaml));
        }
        var set = Load(files, target);
        return new ManifestSet(target, set.Files, set.Objects, [.. problems, .. set.LoadProblems]);
    }

    public static ManifestSet Load(IReadOnlyList<(string Path, string Text)> files, DeployTarget? target = null)
    {
        var objects = new List<ManifestObject>();
        var problems = new List<string>();
        foreach (var (path, text) in files)
        {
            List<object> loaded;
            try
            {
                loaded = KubernetesYaml.LoadAllFromString(text, typeMap: null, strict: true);
            }
            catch (Exception e) when (e is YamlDotNet.Core.YamlException or KeyNotFoundException or FormatException or InvalidOperationException or ArgumentException)
            {
                var inner = e.InnerException is null ? "" : " (" + e.InnerException.Message + ")";
                problems.Add($"{path}: not a valid Kubernetes object: {e.Message}{inner}");
                continue;
            }
            if (loaded.Count == 0) problems.Add($"{path}: holds no object");
            for (var i = 0; i < loaded.Count; i++)
            {
                if (loaded[i] is IKubernetesObject<V1ObjectMeta> k) objects.Add(new ManifestObject(path, i, k));
                else problems.Add($"{path}: object {i} is a {loaded[i]?.GetType().Name ?? "null"}, not a Kubernetes object with metadata");
            }
        }
        return new ManifestSet(target, files, objects, problems);
    }

    public IEnumerable<ManifestObject> OfKind(string kind) => Objects.Where(o => o.Kind == kind);

    public IEnumerable<T> All<T>() => Objects.Select(o => o.Object).OfType<T>();

    /// <summary>Every pod that the manifests run: Deployment and Job templates, and bare Pods.</summary>
    public IReadOnlyList<PodTemplate> Pods()
    {
        var pods = new List<PodTemplate>();
        foreach (var o in Objects)
        {
            switch (o.Object)
            {
                case V1Deployment d when d.Spec?.Template?.Spec is { } spec:
                    pods.Add(new PodTemplate(o, d.Spec.Template.Metadata?.Labels ?? new Dictionary<string, string>(), spec, d.Spec.Template.Metadata?.Annotations));
                    break;
                case V1Job j when j.Spec?.Template?.Spec is { } spec:
                    pods.Add(new PodTemplate(o, j.Spec.Template.Metadata?.Labels ?? new Dictionary<string, string>(), spec, j.Spec.Template.Metadata?.Annotations));
                    break;
                case V1Pod p when p.Spec is { } spec:
                    pods.Add(new PodTemplate(o, p.Metadata?.Labels ?? new Dictionary<string, string>(), spec));
                    break;
            }
        }
        return pods;
    }

    public IReadOnlyList<ContainerInPod> Containers() =>
        Pods().SelectMany(p => (p.Spec.InitContainers ?? []).Concat(p.Spec.Containers ?? []).Select(c => new ContainerInPod(p, c))).ToList();
}
