using System.Text.RegularExpressions;
using k8s.Models;

namespace DistDiffusion.Tests.Deploy;

/// <summary>
/// What the API server would reject beyond what strict typed deserialization catches: the KubernetesClient model
/// classes do not mark required fields nor constrain enums, names and quantities, so the API's rules for the
/// fields these manifests use are checked here (required fields, allowed enum values, DNS names, label syntax,
/// port ranges, quantities, selector/template agreement) together with references between the objects
/// (ConfigMaps, claims, volumes, Service target ports) that `kubectl apply` would accept but that leave pods stuck.
/// </summary>
internal static partial class ManifestSchemaChecks
{
    public static readonly string[] NamespacedKinds = ["ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy", "Job", "Pod", "Secret"];

    private static readonly Dictionary<string, string> ApiVersions = new()
    {
        ["Namespace"] = "v1", ["ConfigMap"] = "v1", ["PersistentVolumeClaim"] = "v1", ["Service"] = "v1", ["Pod"] = "v1", ["Secret"] = "v1",
        ["Deployment"] = "apps/v1", ["Job"] = "batch/v1", ["NetworkPolicy"] = "networking.k8s.io/v1",
    };

    [GeneratedRegex("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")]
    private static partial Regex Dns1123Label();

    [GeneratedRegex(@"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")]
    private static partial Regex Dns1123Subdomain();

    [GeneratedRegex("^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")]
    private static partial Regex LabelNamePart();

    [GeneratedRegex("^[-._a-zA-Z0-9]+$")]
    private static partial Regex ConfigMapKey();

    [GeneratedRegex("^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")]
    private static partial Regex IanaServiceName();

    public static bool IsLabel(string s) => s.Length is > 0 and <= 63 && Dns1123Label().IsMatch(s);

    public static bool IsSubdomain(string s) => s.Length is > 0 and <= 253 && Dns1123Subdomain().IsMatch(s);

    public static List<string> Check(ManifestSet set)
    {
        var p = new List<string>(set.LoadProblems);
        foreach (var o in set.Objects)
        {
            CheckObject(o, p);
            switch (o.Object)
            {
                case V1Namespace: break;
                case V1ConfigMap cm: CheckConfigMap(o, cm, p); break;
                case V1PersistentVolumeClaim pvc: CheckClaim(o, pvc, p); break;
                case V1Deployment d: CheckDeployment(o, d, p); break;
                case V1Job j: CheckJob(o, j, p); break;
                case V1Pod pod: if (pod.Spec is null) p.Add($"{o}: spec is required"); break;
                case V1Service s: CheckService(o, s, set, p); break;
                case V1NetworkPolicy np: CheckNetworkPolicy(o, np, p); break;
                default: p.Add($"{o}: kind {o.Kind} is not one these checks know; add its rules here"); break;
            }
        }
        foreach (var pod in set.Pods()) CheckPodSpec(pod, set, p);
        CheckUniqueNames(set, p);
        return p;
    }

    private static void CheckObject(ManifestObject o, List<string> p)
    {
        if (!ApiVersions.TryGetValue(o.Kind ?? "", out var apiVersion)) return;   // reported by the kind switch
        if (o.Object.ApiVersion != apiVersion) p.Add($"{o}: apiVersion {o.Object.ApiVersion}, expected {apiVersion}");
        var meta = o.Metadata;
        if (meta is null)
        {
            p.Add($"{o}: metadata is required");
            return;
        }
        // generateName (for `kubectl create`) only where a fresh object per use makes sense: Jobs.
        if (meta.Name is null && !(o.Kind == "Job" && meta.GenerateName is not null)) p.Add($"{o}: metadata.name is required");
        if (meta.Name is not null && !IsSubdomain(meta.Name)) p.Add($"{o}: metadata.name '{meta.Name}' is not a DNS-1123 subdomain");
        if (meta.GenerateName is not null && (!IsSubdomain(meta.GenerateName.TrimEnd('-')) || meta.GenerateName.Length > 58))
            p.Add($"{o}: metadata.generateName '{meta.GenerateName}' is not a valid prefix");
        if (NamespacedKinds.Contains(o.Kind) && string.IsNullOrEmpty(meta.NamespaceProperty)) p.Add($"{o}: metadata.namespace is not set (it would land in the current kubectl namespace)");
        if (o.Kind == "Namespace" && meta.NamespaceProperty is not null) p.Add($"{o}: a Namespace has no namespace");
        CheckLabels($"{o} metadata.labels", meta.Labels, p);
    }

    public static void CheckLabels(string where, IDictionary<string, string>? labels, List<string> p)
    {
        if (labels is null) return;
        foreach (var (key, value) in labels)
        {
            var slash = key.IndexOf('/', StringComparison.Ordinal);
            var prefix = slash < 0 ? null : key[..slash];
            var name = slash < 0 ? key : key[(slash + 1)..];
            if (prefix is not null && !IsSubdomain(prefix)) p.Add($"{where}: label key '{key}' has an invalid prefix");
            if (name.Length is 0 or > 63 || !LabelNamePart().IsMatch(name)) p.Add($"{where}: label key '{key}' has an invalid name");
            if (value.Length > 63 || (value.Length > 0 && !LabelNamePart().IsMatch(value))) p.Add($"{where}: label value '{value}' of '{key}' is invalid");
        }
    }

    private static void CheckConfigMap(ManifestObject o, V1ConfigMap cm, List<string> p)
    {
        foreach (var key in (cm.Data?.Keys ?? []).Concat(cm.BinaryData?.Keys ?? []))
            if (key.Length > 253 || !ConfigMapKey().IsMatch(key)) p.Add($"{o}: data key '{key}' is not a valid ConfigMap key");
    }

    private static readonly string[] AccessModes = ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"];

    private static void CheckClaim(ManifestObject o, V1PersistentVolumeClaim pvc, List<string> p)
    {
        var spec = pvc.Spec;
        if (spec is null)
        {
            p.Add($"{o}: spec is required");
            return;
        }
        if (spec.AccessModes is null || spec.AccessModes.Count == 0) p.Add($"{o}: spec.accessModes is required");
        foreach (var m in spec.AccessModes ?? []) if (!AccessModes.Contains(m)) p.Add($"{o}: access mode {m} is not one of {string.Join(", ", AccessModes)}");
        if (spec.Resources?.Requests is null || !spec.Resources.Requests.TryGetValue("storage", out var storage)) p.Add($"{o}: spec.resources.requests.storage is required");
        else if (Quantity(storage) is not > 0) p.Add($"{o}: storage request {storage} is not a positive quantity");
    }

    private static void CheckDeployment(ManifestObject o, V1Deployment d, List<string> p)
    {
        var spec = d.Spec;
        if (spec?.Selector is null || spec.Template is null)
        {
            p.Add($"{o}: spec.selector and spec.template are required");
            return;
        }
        if (spec.Replicas is < 0) p.Add($"{o}: replicas < 0");
        CheckSelector($"{o} spec.selector", spec.Selector, p);
        if ((spec.Selector.MatchLabels?.Count ?? 0) + (spec.Selector.MatchExpressions?.Count ?? 0) == 0) p.Add($"{o}: an empty selector is not allowed");
        if (!Selects(spec.Selector, spec.Template.Metadata?.Labels)) p.Add($"{o}: spec.selector does not match the template's labels");
        CheckLabels($"{o} template labels", spec.Template.Metadata?.Labels, p);
        if (spec.Template.Spec?.RestartPolicy is { } rp && rp != "Always") p.Add($"{o}: a Deployment's pods must have restartPolicy Always, not {rp}");
        if (spec.Strategy?.Type is { } type)
        {
            if (type is not ("Recreate" or "RollingUpdate")) p.Add($"{o}: strategy {type} is not Recreate or RollingUpdate");
            if (type == "Recreate" && spec.Strategy.RollingUpdate is not null) p.Add($"{o}: strategy Recreate may not have rollingUpdate");
            if (spec.Strategy.RollingUpdate is { } ru && IsZero(ru.MaxSurge) && IsZero(ru.MaxUnavailable)) p.Add($"{o}: maxSurge and maxUnavailable may not both be 0");
        }
    }

    private static bool IsZero(IntOrString? v) => v is null ? false : v.Value is "0" or "0%";

    private static void CheckJob(ManifestObject o, V1Job j, List<string> p)
    {
        var spec = j.Spec;
        if (spec?.Template?.Spec is null)
        {
            p.Add($"{o}: spec.template.spec is required");
            return;
        }
        if (spec.Template.Spec.RestartPolicy is not ("Never" or "OnFailure")) p.Add($"{o}: a Job's pods need restartPolicy Never or OnFailure, not {spec.Template.Spec.RestartPolicy ?? "(unset)"}");
        if (spec.BackoffLimit is < 0 || spec.ActiveDeadlineSeconds is <= 0 || spec.TtlSecondsAfterFinished is < 0) p.Add($"{o}: negative or zero limits");
        if (spec.Selector is not null) p.Add($"{o}: set no selector on a Job (the API generates it)");
        CheckLabels($"{o} template labels", spec.Template.Metadata?.Labels, p);
    }

    private static readonly string[] Protocols = ["TCP", "UDP", "SCTP"];

    private static void CheckService(ManifestObject o, V1Service s, ManifestSet set, List<string> p)
    {
        var spec = s.Spec;
        if (spec?.Ports is null || spec.Ports.Count == 0)
        {
            p.Add($"{o}: spec.ports is required");
            return;
        }
        if (spec.Type is { } t && t is not ("ClusterIP" or "NodePort" or "LoadBalancer" or "ExternalName")) p.Add($"{o}: type {t} is not a Service type");
        if (!IsLabel(o.Name)) p.Add($"{o}: a Service name must be a DNS-1123 label");
        var selected = set.Pods().Where(pod => spec.Selector is { Count: > 0 } && spec.Selector.All(kv => pod.Labels.TryGetValue(kv.Key, out var v) && v == kv.Value)).ToList();
        if (selected.Count == 0) p.Add($"{o}: its selector selects no pod of these manifests");
        foreach (var port in spec.Ports)
        {
            if (port.Port is < 1 or > 65535) p.Add($"{o}: port {port.Port} out of range");
            if (port.Protocol is { } proto && !Protocols.Contains(proto)) p.Add($"{o}: protocol {proto}");
            if (spec.Ports.Count > 1 && port.Name is null) p.Add($"{o}: ports need names when there are several");
            if (port.Name is not null && (port.Name.Length > 15 || !IanaServiceName().IsMatch(port.Name))) p.Add($"{o}: port name '{port.Name}' is not an IANA service name");
            var target = port.TargetPort?.Value ?? port.Port.ToString(System.Globalization.CultureInfo.InvariantCulture);
            foreach (var pod in selected)
            {
                var ports = (pod.Spec.Containers ?? []).SelectMany(c => c.Ports ?? []).ToList();
                if (!ports.Any(cp => cp.Name == target || cp.ContainerPort.ToString(System.Globalization.CultureInfo.InvariantCulture) == target))
                    p.Add($"{o}: targetPort {target} is no container port of {pod}");
            }
        }
    }

    private static void CheckNetworkPolicy(ManifestObject o, V1NetworkPolicy np, List<string> p)
    {
        var spec = np.Spec;
        if (spec?.PodSelector is null)
        {
            p.Add($"{o}: spec.podSelector is required ({{}} selects every pod)");
            return;
        }
        CheckSelector($"{o} podSelector", spec.PodSelector, p);
        foreach (var t in spec.PolicyTypes ?? []) if (t is not ("Ingress" or "Egress")) p.Add($"{o}: policy type {t}");
        var peers = (spec.Ingress ?? []).SelectMany(r => r.FromProperty ?? []).Concat((spec.Egress ?? []).SelectMany(r => r.To ?? []));
        foreach (var peer in peers)
        {
            if (peer.IpBlock is not null && (peer.PodSelector is not null || peer.NamespaceSelector is not null)) p.Add($"{o}: ipBlock may not be combined with selectors in one peer");
            if (peer.IpBlock is null && peer.PodSelector is null && peer.NamespaceSelector is null) p.Add($"{o}: an empty peer");
            if (peer.IpBlock is { } b && !System.Net.IPNetwork.TryParse(b.Cidr, out _)) p.Add($"{o}: ipBlock cidr {b.Cidr} is not a CIDR");
            if (peer.PodSelector is { } ps) CheckSelector($"{o} peer podSelector", ps, p);
            if (peer.NamespaceSelector is { } ns) CheckSelector($"{o} peer namespaceSelector", ns, p);
        }
        var ports = (spec.Ingress ?? []).SelectMany(r => r.Ports ?? []).Concat((spec.Egress ?? []).SelectMany(r => r.Ports ?? []));
        foreach (var port in ports)
        {
            if (port.Protocol is { } proto && !Protocols.Contains(proto)) p.Add($"{o}: protocol {proto}");
            if (port.Port is { } v && int.TryParse(v.Value, out var n) && n is < 1 or > 65535) p.Add($"{o}: port {n} out of range");
        }
    }

    private static readonly string[] SelectorOperators = ["In", "NotIn", "Exists", "DoesNotExist"];

    public static void CheckSelector(string where, V1LabelSelector s, List<string> p)
    {
        CheckLabels(where, s.MatchLabels, p);
        foreach (var e in s.MatchExpressions ?? [])
        {
            if (!SelectorOperators.Contains(e.OperatorProperty)) p.Add($"{where}: operator {e.OperatorProperty} is not one of {string.Join(", ", SelectorOperators)}");
            var hasValues = e.Values is { Count: > 0 };
            if (e.OperatorProperty is "In" or "NotIn" && !hasValues) p.Add($"{where}: {e.OperatorProperty} needs values");
            if (e.OperatorProperty is "Exists" or "DoesNotExist" && hasValues) p.Add($"{where}: {e.OperatorProperty} takes no values");
        }
    }

    /// <summary>Whether a label selector selects a set of labels (an empty selector selects everything).</summary>
    public static bool Selects(V1LabelSelector? s, IDictionary<string, string>? labels)
    {
        if (s is null) return false;
        labels ??= new Dictionary<string, string>();
        foreach (var (k, v) in s.MatchLabels ?? new Dictionary<string, string>())
            if (!labels.TryGetValue(k, out var have) || have != v) return false;
        foreach (var e in s.MatchExpressions ?? [])
        {
            var has = labels.TryGetValue(e.Key, out var value);
            var ok = e.OperatorProperty switch
            {
                "In" => has && e.Values!.Contains(value!),
                "NotIn" => !has || !e.Values!.Contains(value!),
                "Exists" => has,
                "DoesNotExist" => !has,
                _ => false,
            };
            if (!ok) return false;
        }
        return true;
    }

    private static readonly string[] PullPolicies = ["Always", "IfNotPresent", "Never"];
    private static readonly string[] TolerationEffects = ["NoSchedule", "PreferNoSchedule", "NoExecute"];

    private static void CheckPodSpec(PodTemplate pod, ManifestSet set, List<string> p)
    {
        var spec = pod.Spec;
        if (spec.Containers is null || spec.Containers.Count == 0) p.Add($"{pod}: at least one container is required");
        if (spec.RestartPolicy is { } rp && rp is not ("Always" or "OnFailure" or "Never")) p.Add($"{pod}: restartPolicy {rp}");
        var volumes = (spec.Volumes ?? []).ToList();
        foreach (var v in volumes)
        {
            if (!IsLabel(v.Name ?? "")) p.Add($"{pod}: volume name '{v.Name}' is not a DNS-1123 label");
            var sources = typeof(V1Volume).GetProperties().Count(pr => pr.Name != nameof(V1Volume.Name) && pr.GetValue(v) is not null);
            if (sources != 1) p.Add($"{pod}: volume {v.Name} has {sources} sources, expected exactly one");
            if (v.PersistentVolumeClaim is { } claim && !set.OfKind("PersistentVolumeClaim").Any(o => o.Name == claim.ClaimName))
                p.Add($"{pod}: volume {v.Name} uses the claim {claim.ClaimName}, which no manifest defines");
            if (v.Secret is { } secret)
            {
                if (string.IsNullOrEmpty(secret.SecretName)) p.Add($"{pod}: volume {v.Name}: secretName is required");
                if (secret.DefaultMode is < 0 or > 511) p.Add($"{pod}: volume {v.Name}: defaultMode {secret.DefaultMode} is not a file mode (0-0777)");
                foreach (var item in secret.Items ?? [])
                    if (string.IsNullOrEmpty(item.Key) || string.IsNullOrEmpty(item.Path) || item.Path.StartsWith('/') || item.Path.Contains("..", StringComparison.Ordinal))
                        p.Add($"{pod}: volume {v.Name}: item {item.Key} -> {item.Path} is not a key and a relative path");
            }
            if (v.EmptyDir?.SizeLimit is { } limit && Quantity(limit) is not > 0) p.Add($"{pod}: volume {v.Name}: sizeLimit {limit}");
        }
        if (volumes.Select(v => v.Name).Distinct().Count() != volumes.Count) p.Add($"{pod}: duplicate volume names");
        foreach (var t in spec.Tolerations ?? [])
        {
            if (t.OperatorProperty is { } op && op is not ("Exists" or "Equal")) p.Add($"{pod}: toleration operator {op}");
            if (t.OperatorProperty == "Exists" && !string.IsNullOrEmpty(t.Value)) p.Add($"{pod}: a toleration with Exists takes no value");
            if (t.Effect is { } eff && !TolerationEffects.Contains(eff)) p.Add($"{pod}: toleration effect {eff}");
        }
        if (spec.Affinity?.NodeAffinity?.RequiredDuringSchedulingIgnoredDuringExecution is { } required)
        {
            if (required.NodeSelectorTerms is null || required.NodeSelectorTerms.Count == 0) p.Add($"{pod}: nodeSelectorTerms is required");
            foreach (var e in (required.NodeSelectorTerms ?? []).SelectMany(t => t.MatchExpressions ?? []))
                if (e.OperatorProperty is not ("In" or "NotIn" or "Exists" or "DoesNotExist" or "Gt" or "Lt")) p.Add($"{pod}: node selector operator {e.OperatorProperty}");
        }
        CheckLabels($"{pod} nodeSelector", spec.NodeSelector, p);
        if (spec.SecurityContext is { } sc)
        {
            if (sc.FsGroupChangePolicy is { } f && f is not ("OnRootMismatch" or "Always")) p.Add($"{pod}: fsGroupChangePolicy {f}");
            if (sc.SeccompProfile?.Type is { } st && st is not ("RuntimeDefault" or "Localhost" or "Unconfined")) p.Add($"{pod}: seccomp profile type {st}");
        }

        var containers = (spec.InitContainers ?? []).Concat(spec.Containers ?? []).ToList();
        if (containers.Select(c => c.Name).Distinct().Count() != containers.Count) p.Add($"{pod}: duplicate container names");
        foreach (var c in containers)
        {
            var where = $"{pod} container {c.Name}";
            if (!IsLabel(c.Name ?? "")) p.Add($"{where}: name is required and must be a DNS-1123 label");
            if (string.IsNullOrWhiteSpace(c.Image)) p.Add($"{where}: image is required");
            if (c.ImagePullPolicy is { } pull && !PullPolicies.Contains(pull)) p.Add($"{where}: imagePullPolicy {pull}");
            foreach (var port in c.Ports ?? [])
            {
                if (port.ContainerPort is < 1 or > 65535) p.Add($"{where}: containerPort {port.ContainerPort} out of range");
                if (port.Protocol is { } proto && !Protocols.Contains(proto)) p.Add($"{where}: protocol {proto}");
                if (port.Name is not null && (port.Name.Length > 15 || !IanaServiceName().IsMatch(port.Name))) p.Add($"{where}: port name '{port.Name}' is not an IANA service name");
            }
            foreach (var (kind, probe) in new[] { ("startup", c.StartupProbe), ("liveness", c.LivenessProbe), ("readiness", c.ReadinessProbe) })
            {
                if (probe is null) continue;
                var handlers = new object?[] { probe.Exec, probe.Grpc, probe.HttpGet, probe.TcpSocket }.Count(h => h is not null);
                if (handlers != 1) p.Add($"{where}: {kind} probe has {handlers} handlers, expected exactly one");
                if (probe.Grpc is { } g && g.Port is < 1 or > 65535) p.Add($"{where}: {kind} probe port {g.Port}");
                if (kind is "startup" or "liveness" && probe.SuccessThreshold is > 1) p.Add($"{where}: {kind} probe successThreshold must be 1");
            }
            var mounts = (c.VolumeMounts ?? []).ToList();
            foreach (var m in mounts)
            {
                if (!volumes.Any(v => v.Name == m.Name)) p.Add($"{where}: mounts volume {m.Name}, which the pod does not define");
                if (string.IsNullOrEmpty(m.MountPath) || !m.MountPath.StartsWith('/')) p.Add($"{where}: mountPath '{m.MountPath}' is not absolute");
            }
            if (mounts.Select(m => m.MountPath).Distinct().Count() != mounts.Count) p.Add($"{where}: two mounts at one path");
            foreach (var e in c.Env ?? [])
            {
                if (string.IsNullOrEmpty(e.Name)) p.Add($"{where}: env entry without a name");
                if (e.Value is not null && e.ValueFrom is not null) p.Add($"{where}: env {e.Name} has both value and valueFrom");
                if (e.ValueFrom?.ConfigMapKeyRef is { } r && !ConfigMapHasKey(set, r.Name, r.Key) && r.Optional != true) p.Add($"{where}: env {e.Name} reads {r.Name}/{r.Key}, which no ConfigMap defines");
            }
            foreach (var ef in c.EnvFrom ?? [])
                if (ef.ConfigMapRef is { } r && !set.OfKind("ConfigMap").Any(o => o.Name == r.Name) && r.Optional != true)
                    p.Add($"{where}: envFrom names the ConfigMap {r.Name}, which no manifest defines");
            foreach (var (kind, list) in new[] { ("requests", c.Resources?.Requests), ("limits", c.Resources?.Limits) })
                foreach (var (name, q) in list ?? new Dictionary<string, ResourceQuantity>())
                    if (Quantity(q) is not >= 0) p.Add($"{where}: {kind}.{name} = {q} is not a quantity");
        }
    }

    private static bool ConfigMapHasKey(ManifestSet set, string name, string key) =>
        set.All<V1ConfigMap>().Any(cm => cm.Metadata?.Name == name && cm.Data?.ContainsKey(key) == true);

    private static void CheckUniqueNames(ManifestSet set, List<string> p)
    {
        foreach (var g in set.Objects.Where(o => o.Metadata?.Name is not null).GroupBy(o => (o.Kind, o.Metadata.NamespaceProperty, o.Metadata.Name)).Where(g => g.Count() > 1))
            p.Add($"{g.Key.Kind} {g.Key.Name} is defined {g.Count()} times");
    }

    /// <summary>A quantity's value, or null when it does not parse.</summary>
    public static decimal? Quantity(ResourceQuantity? q)
    {
        if (q is null) return null;
        try
        {
            return new ResourceQuantity(q.ToString()).ToDecimal();
        }
        catch (FormatException)
        {
            return null;
        }
    }
}
