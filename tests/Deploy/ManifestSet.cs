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

/// <summary>
/// The manifests under deploy/k8s loaded as typed Kubernetes objects. Deserialization is strict: a field the API
/// does not have (a typo, a wrong nesting level), a value of the wrong type, or an apiVersion/kind pair the API
/// does not serve is a load problem, as it would be for `kubectl apply` with server-side field validation.
/// </summary>
internal sealed class ManifestSet
{
    private ManifestSet(IReadOnlyList<(string Path, string Text)> files, IReadOnlyList<ManifestObject> objects, IReadOnlyList<string> loadProblems)
    {
        Files = files;
        Objects = objects;
        LoadProblems = loadProblems;
    }

    public IReadOnlyList<(string Path, string Text)> Files { get; }
    public IReadOnlyList<ManifestObject> Objects { get; }
    public IReadOnlyList<string> LoadProblems { get; }

    public static ManifestSet FromRepo() => Load(RepoFiles.Manifests());

    /// <summary>The repository's manifests with one textual change in one file (for tests showing that a check fails).</summary>
    public static ManifestSet FromRepoWith(string file, string oldText, string newText)
    {
        var files = RepoFiles.Manifests().ToList();
        var i = files.FindIndex(f => f.Path.EndsWith(file, StringComparison.Ordinal));
        if (i < 0) throw new ArgumentException($"no manifest {file}");
        if (!files[i].Text.Contains(oldText, StringComparison.Ordinal)) throw new ArgumentException($"{file} does not contain '{oldText}'");
        files[i] = (files[i].Path, files[i].Text.Replace(oldText, newText, StringComparison.Ordinal));
        return Load(files);
    }

    public static ManifestSet Load(IReadOnlyList<(string Path, string Text)> files)
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
        return new ManifestSet(files, objects, problems);
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
                    pods.Add(new PodTemplate(o, j.Spec.Template.Metadata?.Labels ?? new Dictionary<string, string>(), spec));
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
