using System.Text.RegularExpressions;
using System.Text;
using DistDiffusion.Coordinator.Sampling;
using k8s.Models;

namespace DistDiffusion.Tests.Deploy;

/// <summary>
/// docs/kubernetes.md against the code and the rendered manifests: every `coordinator ...` and `worker ...` command in its
/// code blocks parses with the real command lines, and its kubectl and docker commands name the kustomizations, objects,
/// labels, taints, images and build arguments that the kustomize renders of deploy/k8s and the Dockerfile really have. It
/// must also show each step the deployment needs (image builds of both variants, every Secret the pods mount with every
/// key they read from it, the dataset, the apply of each overlay, waiting for training to complete, serving, port-forward
/// and status, sizing the workers, sampling).
/// </summary>
internal static partial class DocsChecks
{
    [GeneratedRegex(@"^```[a-z]*\s*$")]
    private static partial Regex Fence();

    /// <summary>The command lines of the document's fenced code blocks (continuations joined).</summary>
    public static List<string> CommandLines(string markdown)
    {
        var lines = new List<string>();
        var inBlock = false;
        var current = new StringBuilder();
        foreach (var raw in markdown.Replace("\r\n", "\n", StringComparison.Ordinal).Split('\n'))
        {
            var line = raw.Trim();
            if (Fence().IsMatch(line))
            {
                inBlock = !inBlock;
                continue;
            }
            if (!inBlock || line.Length == 0 || line.StartsWith('#')) continue;
            if (line.EndsWith('\\'))
            {
                current.Append(line[..^1]).Append(' ');
                continue;
            }
            current.Append(line);
            lines.Add(current.ToString().Trim());
            current.Clear();
        }
        return lines;
    }

    /// <summary>Splits a shell command line into words (quotes removed; no expansion).</summary>
    public static List<string> Words(string line)
    {
        var words = new List<string>();
        var w = new StringBuilder();
        var inWord = false;
        char? quote = null;
        foreach (var ch in line)
        {
            if (quote is not null)
            {
                if (ch == quote) quote = null;
                else w.Append(ch);
                continue;
            }
            if (ch is '"' or '\'')
            {
                quote = ch;
                inWord = true;
            }
            else if (char.IsWhiteSpace(ch))
            {
                if (inWord) words.Add(w.ToString());
                w.Clear();
                inWord = false;
            }
            else
            {
                w.Append(ch);
                inWord = true;
            }
        }
        if (inWord) words.Add(w.ToString());
        return words;
    }

    public static List<string> Check(string markdown, IReadOnlyList<ManifestSet> sets, DeployFacts facts, DockerfileFacts docker)
    {
        var p = new List<string>();
        var lines = CommandLines(markdown);
        var apps = sets.Select(set => AppContainers.Of(set, facts, docker)).ToList();
        var images = sets.SelectMany(set => set.Containers()).Select(c => c.Container.Image).ToHashSet(StringComparer.Ordinal);
        // Each Secret the pods mount, with the keys they project from it.
        var secretKeys = sets.SelectMany(set => set.Pods()).SelectMany(pod => pod.Spec.Volumes ?? []).Where(v => v.Secret is not null)
            .GroupBy(v => v.Secret.SecretName, StringComparer.Ordinal)
            .ToDictionary(g => g.Key, g => g.SelectMany(v => v.Secret.Items?.Select(i => i.Key) ?? []).ToHashSet(StringComparer.Ordinal), StringComparer.Ordinal);
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var line in lines)
        {
            var words = Words(line);
            if (words.Count == 0) continue;
            var where = $"{RepoFiles.KubernetesDoc}: `{line}`";
            var program = words[0][(words[0].LastIndexOf('/') + 1)..];
            if (facts.Executables.Contains(program))
            {
                var inv = CliInvocation.Parse(facts, program, words.Skip(1).ToList(), where, p);
                seen.Add(inv.Verb);
            }
            else if (program == "kubectl")
            {
                CheckKubectl(words, where, sets, facts, apps, secretKeys, seen, p);
            }
            else if (program == "docker" && words.Count > 1 && words[1] == "build")
            {
                CheckDockerBuild(words, where, images, facts, seen, p);
            }
        }
        foreach (var (key, what) in new[]
        {
            ("docker build cpu", "building the cpu image"), ("docker build cuda", "building the cuda image"),
            ("apply " + DeployTarget.Gpu.Dir, $"`kubectl apply -k {DeployTarget.Gpu.Dir}`"), ("apply " + DeployTarget.Cpu.Dir, "training on a CPU-only cluster"),
            ("apply " + DeployTarget.Setup, "creating the namespace, the claims and the policies before the first run"), ("apply " + DeployTarget.DownloadJob, "filling the dataset volume"), ("wait coordinator", "waiting for the training coordinator's Job to complete"),
            ("apply " + DeployTarget.GpuServing.Dir, "serving samples after training"), ("apply " + DeployTarget.CpuServing.Dir, "serving on a CPU-only cluster"),
            ("port-forward", "`kubectl port-forward` to the coordinator"), ($"{facts.CoordinatorExe} status", "`coordinator status`"),
            ("patch workers", "sizing the training workers (the worker Job's completions and parallelism)"), ("scale", "scaling the sampling workers"),
            ($"{facts.CoordinatorExe} sample", "requesting samples from outside"),
            ("apply " + DeployTarget.SampleJob, "the sampling Job"), ("label gpu pool", "the GPU pool label"), ("taint gpu pool", "the GPU pool taint"),
        })
            if (!seen.Contains(key)) p.Add($"{RepoFiles.KubernetesDoc} shows no command for {what}");
        foreach (var name in secretKeys.Keys.Order(StringComparer.Ordinal))
            if (!seen.Contains("create secret " + name)) p.Add($"{RepoFiles.KubernetesDoc} shows no command creating the Secret {name}");
        return p;
    }

    private static string? After(List<string> words, params string[] flags)
    {
        for (var i = 0; i < words.Count; i++)
        {
            foreach (var f in flags)
            {
                if (words[i] == f && i + 1 < words.Count) return words[i + 1];
                if (f.StartsWith("--", StringComparison.Ordinal) && words[i].StartsWith(f + "=", StringComparison.Ordinal)) return words[i][(f.Length + 1)..];
            }
        }
        return null;
    }

    private static void CheckKubectl(List<string> words, string where, IReadOnlyList<ManifestSet> sets, DeployFacts facts, List<AppContainers> apps,
        Dictionary<string, HashSet<string>> secretKeys, HashSet<string> seen, List<string> p)
    {
        if (After(words, "-n", "--namespace") is { } ns && ns != ManifestPolicyChecks.Namespace) p.Add($"{where}: namespace {ns}, the manifests use {ManifestPolicyChecks.Namespace}");
        var verbAt = words.FindIndex(w => !w.StartsWith('-') && w != "kubectl" && w != ManifestPolicyChecks.Namespace);
        var verb = verbAt < 0 ? "" : words[verbAt];
        var kustomizations = RepoFiles.Kustomizations().ToDictionary(k => k.Dir, k => k.Kind, StringComparer.Ordinal);
        for (var i = 0; i < words.Count - 1; i++)
        {
            var kustomize = words[i] is "-k" or "--kustomize" || (verb == "kustomize" && i == verbAt);
            if (kustomize)
            {
                var dir = words[i + 1].TrimEnd('/');
                if (!kustomizations.TryGetValue(dir, out var kind)) p.Add($"{where}: {dir} holds no {RepoFiles.Kustomization}");
                else if (kind != "Kustomization") p.Add($"{where}: {dir} is a kustomize {kind}, which only a Kustomization can include");
                if (verb is "apply" or "create") seen.Add("apply " + dir);
                if (verb == "delete" && !dir.StartsWith(RepoFiles.ManifestFolder + "/jobs/", StringComparison.Ordinal))
                    p.Add($"{where}: deletes everything {dir} renders, the volume claims too: the checkpoints and the dataset would be gone (delete the Jobs or Deployments by name)");
                continue;
            }
            // -f is a file only for the verbs that read manifests (for logs it means follow).
            if (words[i] is not ("-f" or "--filename") || verb is not ("apply" or "create" or "delete" or "replace")) continue;
            var path = words[i + 1];
            if (!File.Exists(RepoFiles.PathOf(path)) && !Directory.Exists(RepoFiles.PathOf(path))) p.Add($"{where}: {path} does not exist");
            // A file of a kustomization applied as it is: fine for plain objects, wrong where kustomize fills something in.
            var text = File.Exists(RepoFiles.PathOf(path)) ? File.ReadAllText(RepoFiles.PathOf(path)) : "";
            if (path.StartsWith(RepoFiles.ManifestFolder, StringComparison.Ordinal) && (Directory.Exists(RepoFiles.PathOf(path)) || text.Contains("image:", StringComparison.Ordinal) || text.Contains("configMapRef", StringComparison.Ordinal)))
                p.Add($"{where}: {path} is part of a kustomization: apply it with -k (its images are placeholders and its ConfigMaps are generated)");
        }
        if (After(words, "-l", "--selector") is { } selector)
        {
            var kv = selector.Split('=', 2);
            if (kv.Length != 2 || !sets.SelectMany(s => s.Pods()).Any(pod => pod.Labels.TryGetValue(kv[0], out var v) && v == kv[1])) p.Add($"{where}: no pod of the manifests is labelled {selector}");
        }
        // TYPE/NAME references name objects the manifests define.
        // (words[i] is the word before: a file of -f for the verbs that read manifests, a folder of -k, a patch of -p are no references)
        bool Operand(string before) => before is "-k" or "--kustomize" or "-p" or "--patch" || (before is "-f" or "--filename" && verb is "apply" or "create" or "delete" or "replace") || (before == "kustomize" && verb == "kustomize");
        foreach (var w in words.Skip(1).Where((w, i) => !w.StartsWith('-') && !Operand(words[i]) && Regex.IsMatch(w, "^(deployment|deploy|job|pod|svc|service|configmap|cm)/[a-z0-9.-]+$")))
        {
            var (type, name) = (w[..w.IndexOf('/', StringComparison.Ordinal)], w[(w.IndexOf('/', StringComparison.Ordinal) + 1)..]);
            var kind = type switch { "deployment" or "deploy" => "Deployment", "job" => "Job", "pod" => "Pod", "configmap" or "cm" => "ConfigMap", _ => "Service" };
            if (!sets.Any(s => s.OfKind(kind).Any(o => o.Metadata?.Name == name))) p.Add($"{where}: no {kind} {name} in the manifests");
        }
        string? Named(string prefix) => words.FirstOrDefault(w => w.StartsWith(prefix, StringComparison.Ordinal))?[prefix.Length..];
        switch (verb)
        {
            case "create" when words.Count > verbAt + 3 && words[verbAt + 1] == "secret":
                var name = words[verbAt + 3];
                if (!secretKeys.TryGetValue(name, out var needed))
                {
                    p.Add($"{where}: the pods mount the Secrets {string.Join(", ", secretKeys.Keys.Order(StringComparer.Ordinal))}, not {name}");
                    break;
                }
                var given = SecretKeysOf(words, words[verbAt + 2]);
                foreach (var key in needed.Where(k => !given.Contains(k)).Order(StringComparer.Ordinal))
                    p.Add($"{where}: the pods read the key '{key}' of Secret {name}, which this command does not set (--from-file={key}=...)");
                seen.Add("create secret " + name);
                break;
            case "scale":
                var target = Named("deployment/");
                if (!apps.Any(a => a.Running(facts.WorkerExe).Any(w => w.Container.Pod.Owner.Kind == "Deployment" && w.Container.Pod.Owner.Name == target)))
                    p.Add($"{where}: {target} is not a worker Deployment (the training workers are a Job: patch its completions and parallelism)");
                seen.Add("scale");
                break;
            case "patch" when Named("job/") is { } job:
                CheckWorkerJobPatch(words, where, job, facts, apps, p);
                seen.Add("patch workers");
                break;
            case "wait" when Named("job/") is { } waited:
                var condition = After(words, "--for");
                if (apps.Any(a => a.Running(facts.CoordinatorExe, "serve").Any(s => s.Container.Pod.Owner.Kind == "Job" && s.Container.Pod.Owner.Name == waited)))
                {
                    if (condition != "condition=complete") p.Add($"{where}: the coordinator's Job reports the end of training as --for=condition=complete");
                    seen.Add("wait coordinator");
                }
                break;
            case "port-forward":
                var svc = Named("svc/");
                var ports = words.LastOrDefault(w => Regex.IsMatch(w, @"^\d+:\d+$"))?.Split(':');
                var service = sets.SelectMany(s => s.All<V1Service>()).FirstOrDefault(s => s.Metadata.Name == svc);
                if (service is null || ports is null || !service.Spec.Ports.Any(sp => sp.Port.ToString(System.Globalization.CultureInfo.InvariantCulture) == ports[1]))
                    p.Add($"{where}: forwards to no port of a Service of the manifests");
                seen.Add("port-forward");
                break;
            case "label":
                if (!words.Contains($"{DeployFacts.GpuPoolLabel}={DeployFacts.GpuPoolValue}")) p.Add($"{where}: the GPU pool label is {DeployFacts.GpuPoolLabel}={DeployFacts.GpuPoolValue}");
                seen.Add("label gpu pool");
                break;
            case "taint":
                if (!words.Contains($"{DeployFacts.GpuTaintKey}={DeployFacts.GpuTaintValue}:{DeployFacts.GpuTaintEffect}")) p.Add($"{where}: the GPU pool taint is {DeployFacts.GpuTaintKey}={DeployFacts.GpuTaintValue}:{DeployFacts.GpuTaintEffect}");
                seen.Add("taint gpu pool");
                break;
        }
    }

    /// <summary>`kubectl patch job/NAME -p JSON`: NAME is the training worker Job and the patch keeps completions = parallelism.</summary>
    private static void CheckWorkerJobPatch(List<string> words, string where, string job, DeployFacts facts, List<AppContainers> apps, List<string> p)
    {
        if (!apps.Any(a => a.Running(facts.WorkerExe).Any(w => w.Container.Pod.Owner.Kind == "Job" && w.Container.Pod.Owner.Name == job)))
        {
            p.Add($"{where}: {job} is not the training worker Job");
            return;
        }
        var patch = After(words, "-p", "--patch");
        System.Text.Json.Nodes.JsonNode? spec;
        try
        {
            spec = patch is null ? null : System.Text.Json.Nodes.JsonNode.Parse(patch)?["spec"];
        }
        catch (System.Text.Json.JsonException e)
        {
            p.Add($"{where}: the patch is not JSON: {e.Message}");
            return;
        }
        var completions = spec?["completions"]?.GetValue<int>();
        var parallelism = spec?["parallelism"]?.GetValue<int>();
        if (completions is null || completions != parallelism || completions < 1)
            p.Add($"{where}: an Indexed worker Job changes size by completions and parallelism together, to the same count (got {completions?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "none"} and {parallelism?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "none"})");
    }

    /// <summary>The keys a `kubectl create secret TYPE NAME ...` command sets.</summary>
    private static HashSet<string> SecretKeysOf(List<string> words, string type)
    {
        var keys = new HashSet<string>(StringComparer.Ordinal);
        if (type == "tls")
        {
            if (After(words, "--cert") is not null) keys.Add("tls.crt");
            if (After(words, "--key") is not null) keys.Add("tls.key");
        }
        foreach (var w in words)
        {
            var m = Regex.Match(w, "^--from-(file|literal)=(.+)$");
            if (!m.Success) continue;
            var value = m.Groups[2].Value;
            var eq = value.IndexOf('=', StringComparison.Ordinal);
            // --from-file=PATH names the key after the file; --from-file=KEY=PATH and --from-literal=KEY=VALUE name it.
            keys.Add(eq >= 0 ? value[..eq] : Path.GetFileName(value));
        }
        return keys;
    }

    private static void CheckDockerBuild(List<string> words, string where, HashSet<string> images, DeployFacts facts, HashSet<string> seen, List<string> p)
    {
        if (After(words, "-f", "--file") != RepoFiles.Dockerfile) p.Add($"{where}: build with -f {RepoFiles.Dockerfile}");
        if (words[^1] != ".") p.Add($"{where}: the build context is the repository root (.), where .dockerignore is");
        var device = facts.DefaultTorchDevice;
        for (var i = 0; i < words.Count - 1; i++)
        {
            if (words[i] != "--build-arg") continue;
            var kv = words[i + 1].Split('=', 2);
            if (kv[0] != DockerfileChecks.DeviceArg) p.Add($"{where}: the Dockerfile takes no build argument {kv[0]}");
            else if (kv.Length < 2 || !facts.TorchDevices.Contains(kv[1])) p.Add($"{where}: {DockerfileChecks.DeviceArg} must be one of {string.Join(", ", facts.TorchDevices)}");
            else device = kv[1];
        }
        var tag = After(words, "-t", "--tag");
        if (tag is null || !images.Contains(tag)) p.Add($"{where}: tags {tag}, which no manifest runs ({string.Join(", ", images)})");
        else if (!tag.EndsWith("-" + device, StringComparison.Ordinal)) p.Add($"{where}: a {device} build tagged {tag}");
        seen.Add($"docker build {device}");
    }
}
