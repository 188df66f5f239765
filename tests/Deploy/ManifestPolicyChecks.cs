using k8s.Models;

namespace DistDiffusion.Tests.Deploy;

/// <summary>
/// The deployment's own rules: resources on every container, probes where a container serves, the restricted
/// security context, GPUs and the GPU pool for workers, one Recreate coordinator, and network policies that
/// let exactly the pods that dial the coordinator reach it.
/// </summary>
internal static class ManifestPolicyChecks
{
    public const string Namespace = "distdiffusion";

    public static List<string> Check(ManifestSet set, DeployFacts facts, DockerfileFacts docker)
    {
        var p = new List<string>();
        CheckLayout(set, p);
        var apps = AppContainers.Of(set, facts, docker);   // its own problems are CodeCrossChecks' to report
        foreach (var c in set.Containers()) CheckResources(c, p);
        foreach (var c in set.Containers()) CheckProbes(c, facts, p);
        foreach (var pod in set.Pods()) CheckSecurity(pod, docker, apps, p);
        CheckGpuPool(set, facts, apps, p);
        CheckCoordinatorDeployment(set, facts, apps, p);
        CheckNetworkPolicies(set, facts, apps, p);
        return p;
    }

    private static void CheckLayout(ManifestSet set, List<string> p)
    {
        // `kubectl apply -f deploy/k8s` reads the folder's files in name order and does not descend into jobs/.
        var topLevel = set.Objects.Where(o => !o.File[(RepoFiles.ManifestFolder.Length + 1)..].Contains('/', StringComparison.Ordinal)).ToList();
        var namespaces = set.OfKind("Namespace").ToList();
        if (namespaces.Count != 1 || namespaces[0].Name != Namespace) p.Add($"expected one Namespace {Namespace}, found {namespaces.Count}");
        else if (topLevel.Count == 0 || topLevel[0].Kind != "Namespace") p.Add($"the Namespace must be the first object `kubectl apply -f {RepoFiles.ManifestFolder}` creates (it reads files in name order)");
        else if (namespaces[0].Metadata.Labels?.TryGetValue("pod-security.kubernetes.io/enforce", out var level) != true || level != "restricted")
            p.Add("the Namespace does not enforce the restricted Pod Security Standard");
        foreach (var o in set.Objects.Where(o => ManifestSchemaChecks.NamespacedKinds.Contains(o.Kind) && o.Metadata?.NamespaceProperty != Namespace))
            p.Add($"{o}: namespace {o.Metadata?.NamespaceProperty ?? "(unset)"}, expected {Namespace}");
        foreach (var o in topLevel.Where(o => o.Kind is "Job" or "Pod"))
            p.Add($"{o}: one-off Jobs and Pods belong in {RepoFiles.ManifestFolder}/jobs/, which `kubectl apply -f {RepoFiles.ManifestFolder}` does not apply");
        foreach (var o in set.OfKind("Secret"))
            p.Add($"{o}: no Secret is committed; the token Secret is created by hand (docs/kubernetes.md)");
        foreach (var o in set.OfKind("ConfigMap"))
            foreach (var (k, v) in ((V1ConfigMap)o.Object).Data ?? new Dictionary<string, string>())
                if (k.Contains("TOKEN", StringComparison.OrdinalIgnoreCase)) p.Add($"{o}: {k}: the token does not go into a ConfigMap");
    }

    private static void CheckResources(ContainerInPod c, List<string> p)
    {
        var requests = c.Container.Resources?.Requests ?? new Dictionary<string, ResourceQuantity>();
        var limits = c.Container.Resources?.Limits ?? new Dictionary<string, ResourceQuantity>();
        foreach (var r in new[] { "cpu", "memory" })
        {
            if (!requests.ContainsKey(r)) p.Add($"{c}: no {r} request");
            if (!limits.ContainsKey(r)) p.Add($"{c}: no {r} limit");
        }
        foreach (var (name, limit) in limits)
        {
            if (!requests.TryGetValue(name, out var request)) continue;
            var (req, lim) = (ManifestSchemaChecks.Quantity(request), ManifestSchemaChecks.Quantity(limit));
            if (req > lim) p.Add($"{c}: {name} request {request} exceeds its limit {limit}");
            // Extended resources (vendor.domain/name) cannot be overcommitted: whole units, request equal to limit.
            if (name.Contains('/', StringComparison.Ordinal) && (req != lim || decimal.Truncate(lim ?? 0.5m) != lim))
                p.Add($"{c}: {name} must be a whole number with request = limit (got {request} / {limit})");
        }
    }

    private static void CheckProbes(ContainerInPod c, DeployFacts facts, List<string> p)
    {
        var ports = c.Container.Ports ?? [];
        if (ports.Count == 0)
        {
            if (c.Container.LivenessProbe is not null || c.Container.ReadinessProbe is not null)
                foreach (var probe in new[] { c.Container.LivenessProbe, c.Container.ReadinessProbe }.OfType<V1Probe>())
                    if (probe.Grpc is not null || probe.HttpGet is not null || probe.TcpSocket is not null) p.Add($"{c}: a network probe on a container that serves nothing");
            return;
        }
        foreach (var port in ports)
            if (port.ContainerPort != facts.DefaultPort && port.ContainerPort != facts.DefaultHealthPort && port.ContainerPort != facts.DefaultHttpPort)
                p.Add($"{c}: serves port {port.ContainerPort}, but the coordinator's ports are {facts.DefaultPort} (Names.DefaultPort), the health port {facts.DefaultHealthPort} (Names.DefaultHealthPort) and the metrics port {facts.DefaultHttpPort} (Names.DefaultHttpPort)");
        foreach (var (kind, probe) in new[] { ("liveness", c.Container.LivenessProbe), ("readiness", c.Container.ReadinessProbe), ("startup", c.Container.StartupProbe) })
        {
            if (probe is null)
            {
                if (kind != "startup") p.Add($"{c}: serves port {ports[0].ContainerPort} but has no {kind} probe");
                continue;
            }
            // Native gRPC probes call grpc.health.v1.Health/Check, the one method the coordinator serves without a token;
            // which port they must use (the cleartext health port beside TLS) is SecurityChecks' to say.
            if (probe.Grpc is null) p.Add($"{c}: the {kind} probe is not a gRPC (grpc.health.v1) probe");
            else if (!ports.Any(cp => cp.ContainerPort == probe.Grpc.Port))
                p.Add($"{c}: the {kind} probe checks port {probe.Grpc.Port}, which the container does not serve");
            else if (!string.IsNullOrEmpty(probe.Grpc.Service) && !probe.Grpc.Service.StartsWith("distdiffusion.v1.", StringComparison.Ordinal))
                p.Add($"{c}: the {kind} probe asks about service {probe.Grpc.Service}, which the coordinator's health service does not report");
        }
    }

    private static void CheckSecurity(PodTemplate pod, DockerfileFacts docker, AppContainers apps, List<string> p)
    {
        var spec = pod.Spec;
        var psc = spec.SecurityContext;
        if (spec.HostNetwork == true || spec.HostPID == true || spec.HostIPC == true) p.Add($"{pod}: uses the host's network, PID or IPC namespace");
        if (spec.AutomountServiceAccountToken != false) p.Add($"{pod}: mounts a service account token it has no use for (set automountServiceAccountToken: false)");
        if (spec.EnableServiceLinks != false)
            p.Add($"{pod}: enableServiceLinks must be false: the Service distdiffusion-coordinator would inject DISTDIFFUSION_COORDINATOR_* variables into the coordinator's configuration prefix");
        if (psc?.SeccompProfile?.Type != "RuntimeDefault") p.Add($"{pod}: pod seccompProfile is not RuntimeDefault");
        if ((spec.Volumes ?? []).Any(v => v.HostPath is not null)) p.Add($"{pod}: hostPath volumes are not allowed");
        foreach (var c in (spec.InitContainers ?? []).Concat(spec.Containers ?? []))
        {
            var where = $"{pod} container {c.Name}";
            var sc = c.SecurityContext;
            if ((sc?.RunAsNonRoot ?? psc?.RunAsNonRoot) != true) p.Add($"{where}: runAsNonRoot is not true");
            var uid = sc?.RunAsUser ?? psc?.RunAsUser;
            if (uid is null or 0) p.Add($"{where}: runAsUser is not a non-zero uid");
            else if (uid != docker.Uid) p.Add($"{where}: runAsUser {uid} differs from the image's USER {docker.Uid}");
            if ((sc?.RunAsGroup ?? psc?.RunAsGroup) is 0) p.Add($"{where}: runs with group 0");
            if (sc?.AllowPrivilegeEscalation != false) p.Add($"{where}: allowPrivilegeEscalation is not false");
            if (sc?.ReadOnlyRootFilesystem != true) p.Add($"{where}: readOnlyRootFilesystem is not true");
            if (sc?.Privileged == true) p.Add($"{where}: privileged");
            if (sc?.Capabilities?.Drop?.Contains("ALL") != true) p.Add($"{where}: does not drop ALL capabilities");
            if (sc?.Capabilities?.Add is { Count: > 0 }) p.Add($"{where}: adds capabilities");
            if (sc?.SeccompProfile?.Type is { } t && t != "RuntimeDefault") p.Add($"{where}: seccomp profile {t}");
            // .NET keeps its diagnostics socket and temporary files in /tmp: with a read-only root it needs a writable mount there.
            if (apps.IsApp(pod, c) && !(c.VolumeMounts ?? []).Any(m => m.MountPath == "/tmp" && m.ReadOnlyProperty != true && (spec.Volumes ?? []).Any(v => v.Name == m.Name && v.EmptyDir is not null)))
                p.Add($"{where}: runs .NET on a read-only root filesystem without a writable emptyDir at /tmp");
        }
    }

    private static bool Tolerates(IEnumerable<V1Toleration>? tolerations, string key, string value, string effect) =>
        (tolerations ?? []).Any(t =>
            (t.Key == key || (string.IsNullOrEmpty(t.Key) && t.OperatorProperty == "Exists"))
            && (t.OperatorProperty == "Exists" || t.Value == value)
            && (string.IsNullOrEmpty(t.Effect) || t.Effect == effect));

    private static void CheckGpuPool(ManifestSet set, DeployFacts facts, AppContainers apps, List<string> p)
    {
        var workers = apps.Running(facts.WorkerExe).ToList();
        if (workers.Count == 0) p.Add($"no container runs {facts.WorkerExe}");
        foreach (var w in workers)
        {
            var limits = w.Container.Container.Resources?.Limits ?? new Dictionary<string, ResourceQuantity>();
            if (!limits.TryGetValue(DeployFacts.GpuResource, out var gpus) || ManifestSchemaChecks.Quantity(gpus) != 1)
                p.Add($"{w}: a worker takes exactly one GPU: limits.{DeployFacts.GpuResource} must be 1");
            var spec = w.Container.Pod.Spec;
            if (spec.NodeSelector?.TryGetValue(DeployFacts.GpuPoolLabel, out var pool) != true || pool != DeployFacts.GpuPoolValue)
                p.Add($"{w}: nodeSelector does not pick the GPU pool ({DeployFacts.GpuPoolLabel}={DeployFacts.GpuPoolValue})");
            if (!Tolerates(spec.Tolerations, DeployFacts.GpuTaintKey, DeployFacts.GpuTaintValue, DeployFacts.GpuTaintEffect))
                p.Add($"{w}: does not tolerate the GPU pool's taint {DeployFacts.GpuTaintKey}={DeployFacts.GpuTaintValue}:{DeployFacts.GpuTaintEffect}");
            if (w.Container.Pod.Owner.Kind != "Deployment") p.Add($"{w}: workers run as a Deployment (so `kubectl scale` adds and removes them)");
            if (w.Image.Variant != "cuda") p.Add($"{w}: a GPU worker runs the cuda image variant, not '{w.Image.Variant}'");
            if (w.Invocation.Value("--device") is { } device && device != "auto" && !device.StartsWith("cuda", StringComparison.Ordinal))
                p.Add($"{w}: --device {device} on a GPU worker");
        }
        foreach (var c in set.Containers().Where(c => !workers.Any(w => w.Container == c)))
        {
            if (c.Container.Resources?.Limits?.ContainsKey(DeployFacts.GpuResource) == true || c.Container.Resources?.Requests?.ContainsKey(DeployFacts.GpuResource) == true)
                p.Add($"{c}: only workers use GPUs");
            if (Tolerates(c.Pod.Spec.Tolerations, DeployFacts.GpuTaintKey, DeployFacts.GpuTaintValue, DeployFacts.GpuTaintEffect))
                p.Add($"{c}: tolerates the GPU taint: it could take a GPU node's place");
        }
    }

    private static void CheckCoordinatorDeployment(ManifestSet set, DeployFacts facts, AppContainers apps, List<string> p)
    {
        var servers = apps.Running(facts.CoordinatorExe, "serve").ToList();
        if (servers.Count != 1)
        {
            p.Add($"expected exactly one container running `{facts.CoordinatorExe} serve`, found {servers.Count}");
            return;
        }
        var s = servers[0];
        if (s.Container.Pod.Owner.Object is not V1Deployment d) p.Add($"{s}: the coordinator runs as a Deployment");
        else
        {
            if (d.Spec.Replicas != 1) p.Add($"{s}: the coordinator Deployment must have exactly 1 replica");
            if (d.Spec.Strategy?.Type != "Recreate") p.Add($"{s}: the coordinator Deployment must use the Recreate strategy (never two coordinators on one run folder)");
        }
        if (s.Image.Variant != facts.DefaultTorchDevice) p.Add($"{s}: the coordinator runs on a CPU node: image variant {facts.DefaultTorchDevice}, not {s.Image.Variant}");
        var required = s.Container.Pod.Spec.Affinity?.NodeAffinity?.RequiredDuringSchedulingIgnoredDuringExecution?.NodeSelectorTerms ?? [];
        var avoidsGpu = required.Count > 0 && required.All(t => (t.MatchExpressions ?? []).Any(e => e.Key == DeployFacts.GpuPoolLabel
            && ((e.OperatorProperty == "NotIn" && e.Values?.Contains(DeployFacts.GpuPoolValue) == true) || e.OperatorProperty == "DoesNotExist")));
        if (!avoidsGpu) p.Add($"{s}: the coordinator's required node affinity does not keep it off the GPU pool ({DeployFacts.GpuPoolLabel} NotIn [{DeployFacts.GpuPoolValue}])");
        var spec = s.Container.Pod.Spec;
        var resume = s.Invocation.Value("--resume");
        if (resume is not null && AppContainers.MountFor(s.Container, resume) is { } m)
        {
            var claim = (spec.Volumes ?? []).FirstOrDefault(v => v.Name == m.Name)?.PersistentVolumeClaim?.ClaimName;
            var pvc = set.All<V1PersistentVolumeClaim>().FirstOrDefault(x => x.Metadata?.Name == claim);
            if (pvc is null) p.Add($"{s}: --resume {resume} is not on a PersistentVolumeClaim: a rescheduled coordinator would start over");
            else if (pvc.Spec.AccessModes?.Contains("ReadWriteOnce") != true && pvc.Spec.AccessModes?.Contains("ReadWriteOncePod") != true)
                p.Add($"{s}: the checkpoint claim {claim} should be ReadWriteOnce (one writer)");
        }
    }

    private static void CheckNetworkPolicies(ManifestSet set, DeployFacts facts, AppContainers apps, List<string> p)
    {
        var policies = set.All<V1NetworkPolicy>().ToList();
        if (!policies.Any(np => (np.Spec.PodSelector.MatchLabels?.Count ?? 0) + (np.Spec.PodSelector.MatchExpressions?.Count ?? 0) == 0
                && np.Spec.PolicyTypes?.Contains("Ingress") == true && np.Spec.PolicyTypes?.Contains("Egress") == true
                && (np.Spec.Ingress?.Count ?? 0) == 0 && (np.Spec.Egress?.Count ?? 0) == 0))
            p.Add("no default-deny NetworkPolicy (podSelector {}, policyTypes Ingress and Egress, no rules)");
        var coordinator = apps.Running(facts.CoordinatorExe, "serve").Select(s => s.Container.Pod).FirstOrDefault();
        if (coordinator is null) return;
        var monitoring = false;
        foreach (var np in policies.Where(np => ManifestSchemaChecks.Selects(np.Spec.PodSelector, coordinator.Labels)))
            foreach (var rule in np.Spec.Ingress ?? [])
            {
                // The one exception: labelled pods of one named namespace (the monitoring one) on the metrics port only.
                var metricsOnly = rule.Ports is { Count: > 0 } && rule.Ports.All(x => x.Port?.Value == facts.DefaultHttpPort.ToString(System.Globalization.CultureInfo.InvariantCulture) && x.EndPort is null);
                bool Labelled(V1LabelSelector? s) => s is not null && (s.MatchLabels?.Count ?? 0) + (s.MatchExpressions?.Count ?? 0) > 0;
                bool Scraper(V1NetworkPolicyPeer peer) => metricsOnly && peer.IpBlock is null && Labelled(peer.PodSelector)
                    && peer.NamespaceSelector?.MatchLabels?.ContainsKey("kubernetes.io/metadata.name") == true;
                if (rule.FromProperty is { Count: > 0 } && rule.FromProperty.All(Scraper))
                {
                    monitoring = true;
                    continue;
                }
                if (rule.FromProperty is not { Count: > 0 } || rule.FromProperty.Any(peer => peer.IpBlock is not null || peer.NamespaceSelector is not null || peer.PodSelector is null
                        || (peer.PodSelector.MatchLabels?.Count ?? 0) + (peer.PodSelector.MatchExpressions?.Count ?? 0) == 0))
                    p.Add($"NetworkPolicy {np.Metadata.Name}: lets more than labelled pods of this namespace reach the coordinator");
            }
        if (!monitoring)
            p.Add($"no NetworkPolicy lets a monitoring namespace's (labelled) pods reach the coordinator's metrics port {facts.DefaultHttpPort}, and only it");
        CheckScrapeAnnotations(coordinator, apps, facts, p);
        foreach (var pod in set.Pods().Where(x => x != coordinator))
        {
            var dials = apps.All.Where(a => a.Container.Pod == pod).Any(a => a.CoordinatorUrl is not null);
            var reaches = Allowed(policies, pod, coordinator, facts.DefaultPort, "TCP");
            if (dials && !reaches) p.Add($"{pod}: dials the coordinator, but the network policies do not let it reach port {facts.DefaultPort}");
            if (!dials && reaches) p.Add($"{pod}: does not use the coordinator, yet the network policies let it reach port {facts.DefaultPort}");
            if (Allowed(policies, pod, coordinator, facts.DefaultHealthPort, "TCP"))
                p.Add($"{pod}: the network policies let it reach the coordinator's cleartext health port {facts.DefaultHealthPort}, which only the kubelet needs");
            if (dials && !EgressAllowed(policies, pod, null, 53, "UDP")) p.Add($"{pod}: dials the coordinator by name but may not send DNS queries (UDP 53)");
            var downloads = apps.All.Any(a => a.Container.Pod == pod && a.Invocation.Command.Name == "download");
            if (downloads && !(EgressAllowed(policies, pod, null, 443, "TCP") && EgressAllowed(policies, pod, null, 53, "UDP")))
                p.Add($"{pod}: downloads a dataset but may not reach HTTPS and DNS");
        }
    }

    /// <summary>prometheus.io/* annotations on the coordinator's pod that match its --http listener.</summary>
    private static void CheckScrapeAnnotations(PodTemplate coordinator, AppContainers apps, DeployFacts facts, List<string> p)
    {
        var serve = apps.Running(facts.CoordinatorExe, "serve").First();
        var http = serve.Invocation.Value("--http");
        if (http is null || !Uri.TryCreate(http, UriKind.Absolute, out var url))
        {
            p.Add($"{serve}: no --http URL: nothing serves /metrics");
            return;
        }
        var annotations = coordinator.Annotations;
        string? A(string key) => annotations.TryGetValue(key, out var v) ? v : null;
        if (A("prometheus.io/scrape") != "true") p.Add($"{coordinator}: no prometheus.io/scrape: \"true\" annotation");
        if (A("prometheus.io/port") != url.Port.ToString(System.Globalization.CultureInfo.InvariantCulture)) p.Add($"{coordinator}: prometheus.io/port is {A("prometheus.io/port") ?? "missing"}, but --http listens on {url.Port}");
        if ((A("prometheus.io/scheme") ?? "http") != url.Scheme) p.Add($"{coordinator}: prometheus.io/scheme is {A("prometheus.io/scheme") ?? "missing (http)"}, but --http speaks {url.Scheme}");
        if ((A("prometheus.io/path") ?? "/metrics") != "/metrics") p.Add($"{coordinator}: prometheus.io/path is {A("prometheus.io/path")}, but the metrics are at /metrics");
        if (url.Port != facts.DefaultHttpPort) p.Add($"{serve}: --http port {url.Port} is not {facts.DefaultHttpPort} (Names.DefaultHttpPort)");
        if (!(serve.Container.Container.Ports ?? []).Any(cp => cp.ContainerPort == url.Port)) p.Add($"{serve}: the metrics port {url.Port} is no containerPort");
    }

    private static bool Allowed(List<V1NetworkPolicy> policies, PodTemplate from, PodTemplate to, int port, string protocol) =>
        EgressAllowed(policies, from, to, port, protocol) && IngressAllowed(policies, from, to, port, protocol);

    private static bool Isolates(V1NetworkPolicy np, PodTemplate pod, string direction) =>
        ManifestSchemaChecks.Selects(np.Spec.PodSelector, pod.Labels)
        && (np.Spec.PolicyTypes?.Contains(direction) ?? (direction == "Ingress" || np.Spec.Egress is not null));

    private static bool PortMatches(IList<V1NetworkPolicyPort>? ports, int port, string protocol) =>
        ports is not { Count: > 0 } || ports.Any(x => (x.Protocol ?? "TCP") == protocol
            && (x.Port is null || (int.TryParse(x.Port.Value, out var n) && (x.EndPort is { } end ? port >= n && port <= end : port == n))));

    /// <summary>A peer matches a pod of this namespace by pod selector; ipBlock is taken to match any address (some CNIs apply it to pods).</summary>
    private static bool PeerMatches(IList<V1NetworkPolicyPeer>? peers, PodTemplate? pod) =>
        peers is not { Count: > 0 } || peers.Any(peer => peer.IpBlock is not null
            || (pod is not null && peer.PodSelector is not null && peer.NamespaceSelector is null && ManifestSchemaChecks.Selects(peer.PodSelector, pod.Labels))
            || (pod is null && peer.NamespaceSelector is not null));

    /// <summary>Whether <paramref name="from"/> may send to <paramref name="to"/> (null: an address outside these manifests) on the port.</summary>
    private static bool EgressAllowed(List<V1NetworkPolicy> policies, PodTemplate from, PodTemplate? to, int port, string protocol)
    {
        var isolating = policies.Where(np => Isolates(np, from, "Egress")).ToList();
        return isolating.Count == 0 || isolating.Any(np => (np.Spec.Egress ?? []).Any(r => PeerMatches(r.To, to) && PortMatches(r.Ports, port, protocol)));
    }

    private static bool IngressAllowed(List<V1NetworkPolicy> policies, PodTemplate from, PodTemplate to, int port, string protocol)
    {
        var isolating = policies.Where(np => Isolates(np, to, "Ingress")).ToList();
        return isolating.Count == 0 || isolating.Any(np => (np.Spec.Ingress ?? []).Any(r => PeerMatches(r.FromProperty, from) && PortMatches(r.Ports, port, protocol)));
    }
}
