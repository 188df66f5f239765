using System.Text.RegularExpressions;
using System.Text;
using DistDiffusion.Coordinator.Sampling;
using k8s.Models;

namespace DistDiffusion.Tests.Deploy;

/// <summary>
/// docs/kubernetes.md against the code and the manifests: every `coordinator ...` and `worker ...` command in its code
/// blocks parses with the real command lines, and its kubectl and docker commands name the objects, files, labels,
/// taints, images and build arguments the manifests and the Dockerfile really have. It must also show each step the
/// deployment needs (image builds of both variants, every Secret the pods mount with every key they read from it, the
/// apply, port-forward and status, scale, sampling).
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

    public static List<string> Check(string markdown, ManifestSet set, DeployFacts facts, DockerfileFacts docker)
    {
        var p = new List<string>();
        var lines = CommandLines(markdown);
        var apps = AppContainers.Of(set, facts, docker);
        var images = set.Containers().Select(c => c.Container.Image).ToHashSet(StringComparer.Ordinal);
        // Each Secret the pods mount, with the keys they project from it.
        var secretKeys = set.Pods().SelectMany(pod => pod.Spec.Volumes ?? []).Where(v => v.Secret is not null)
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
                CheckKubectl(words, where, set, facts, apps, secretKeys, seen, p);
            }
            else if (program == "docker" && words.Count > 1 && words[1] == "build")
            {
                CheckDockerBuild(words, where, images, facts, seen, p);
            }
        }
        foreach (var (key, what) in new[]
        {
            ("docker build cpu", "building the cpu image"), ("docker build cuda", "building the cuda image"),
            ("apply deploy/k8s", "`kubectl apply -f deploy/k8s`"),
            ("port-forward", "`kubectl port-forward` to the coordinator"), ($"{facts.CoordinatorExe} status", "`coordinator status`"),
            ("scale", "scaling the workers"), ($"{facts.CoordinatorExe} sample", "requesting samples from outside"),
            ("create jobs/sample.yaml", "the sampling Job"), ("label gpu pool", "the GPU pool label"), ("taint gpu pool", "the GPU pool taint"),
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

    private static void CheckKubectl(List<string> words, string where, ManifestSet set, DeployFacts facts, AppContainers apps, Dictionary<string, HashSet<string>> secretKeys, HashSet<string> seen, List<string> p)
    {
        if (After(words, "-n", "--namespace") is { } ns && ns != ManifestPolicyChecks.Namespace) p.Add($"{where}: namespace {ns}, the manifests use {ManifestPolicyChecks.Namespace}");
        var verbAt = words.FindIndex(w => !w.StartsWith('-') && w != "kubectl" && w != ManifestPolicyChecks.Namespace);
        var verb = verbAt < 0 ? "" : words[verbAt];
        for (var i = 0; i < words.Count - 1; i++)
        {
            // -f is a file only for the verbs that read manifests (for logs it means follow).
            if (words[i] is not ("-f" or "--filename") || verb is not ("apply" or "create" or "delete" or "replace")) continue;
            var path = words[i + 1];
            if (!File.Exists(RepoFiles.PathOf(path)) && !Directory.Exists(RepoFiles.PathOf(path))) p.Add($"{where}: {path} does not exist");
            if (path.TrimEnd('/') == RepoFiles.ManifestFolder && words.Contains("apply")) seen.Add("apply deploy/k8s");
            if (path.EndsWith("jobs/sample.yaml", StringComparison.Ordinal))
            {
                if (!words.Contains("create")) p.Add($"{where}: the sampling Job has a generateName: it needs `kubectl create`, not apply");
                seen.Add("create jobs/sample.yaml");
            }
        }
        if (After(words, "-l", "--selector") is { } selector)
        {
            var kv = selector.Split('=', 2);
            if (kv.Length != 2 || !set.Pods().Any(pod => pod.Labels.TryGetValue(kv[0], out var v) && v == kv[1])) p.Add($"{where}: no pod of the manifests is labelled {selector}");
        }
        // TYPE/NAME references name objects the manifests define.
        foreach (var w in words.Skip(1).Where((w, i) => !w.StartsWith('-') && words[i] is not ("-f" or "--filename") && Regex.IsMatch(w, "^(deployment|deploy|job|pod|svc|service)/[a-z0-9.-]+$")))
        {
            var (type, name) = (w[..w.IndexOf('/', StringComparison.Ordinal)], w[(w.IndexOf('/', StringComparison.Ordinal) + 1)..]);
            var kind = type switch { "deployment" or "deploy" => "Deployment", "job" => "Job", "pod" => "Pod", _ => "Service" };
            if (!set.OfKind(kind).Any(o => o.Metadata?.Name == name)) p.Add($"{where}: no {kind} {name} in the manifests");
        }
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
                var target = words.FirstOrDefault(w => w.StartsWith("deployment/", StringComparison.Ordinal))?["deployment/".Length..];
                if (!apps.Running(facts.WorkerExe).Any(a => a.Container.Pod.Owner.Name == target)) p.Add($"{where}: {target} is not the worker Deployment");
                seen.Add("scale");
                break;
            case "port-forward":
                var svc = words.FirstOrDefault(w => w.StartsWith("svc/", StringComparison.Ordinal))?[4..];
                var ports = words.LastOrDefault(w => Regex.IsMatch(w, @"^\d+:\d+$"))?.Split(':');
                var service = set.All<V1Service>().FirstOrDefault(s => s.Metadata.Name == svc);
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
