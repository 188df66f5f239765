using k8s.Models;

namespace DistDiffusion.Tests.Deploy;

/// <summary>
/// The deployment's own rules, on one rendered target: resources on every container, probes where a container serves,
/// the restricted security context, GPUs and the GPU pool for the GPU overlays' workers (and neither for the CPU
/// overlays'), a training run as Jobs that complete with it (or one Recreate sample-only coordinator for serving),
/// settings from generated ConfigMaps, one-offs kept out of the overlays, and network policies that let exactly the pods
/// that dial the coordinator reach it.
/// </summary>
internal static partial class ManifestPolicyChecks
{
    public const string Namespace = "distdiffusion";

    public static List<string> Check(ManifestSet set, DeployFacts facts, DockerfileFacts docker)
    {
        var p = new List<string>();
        var apps = AppContainers.Of(set, facts, docker);   // its own problems are CodeCrossChecks' to report
        CheckLayout(set, facts, apps, p);
        foreach (var c in set.Containers()) CheckResources(c, p);
        foreach (var c in set.Containers()) CheckProbes(c, facts, p);
        foreach (var pod in set.Pods()) CheckSecurity(pod, docker, apps, p);
        CheckGpuPool(set, facts, apps, p);
        CheckCoordinator(set, facts, apps, p);
        CheckWorkers(set, facts, apps, p);
        CheckNetworkPolicies(set, facts, apps, p);
        return p;
    }

    [System.Text.RegularExpressions.GeneratedRegex("^(?<name>[a-z0-9.-]+)-(?<hash>[a-z0-9]{10})$")]
    private static partial System.Text.RegularExpressions.Regex GeneratedName();

    private static void CheckLayout(ManifestSet set, DeployFacts facts, AppContainers apps, List<string> p)
    {
        var target = set.Target?.Dir ?? RepoFiles.ManifestFolder;
        var namespaces = set.OfKind("Namespace").ToList();
        if (namespaces.Count != 1 || namespaces[0].Name != Namespace) p.Add($"expected one Namespace {Namespace}, found {namespaces.Count}");
        else if (namespaces[0].File != target) p.Add($"{namespaces[0]}: the Namespace belongs to {target}, which creates it before what lives in it");
        else if (namespaces[0].Metadata.Labels?.TryGetValue("pod-security.kubernetes.io/enforce", out var level) != true || level != "restricted")
            p.Add("the Namespace does not enforce the restricted Pod Security Standard");
        foreach (var o in set.Objects.Where(o => ManifestSchemaChecks.NamespacedKinds.Contains(o.Kind) && o.Metadata?.NamespaceProperty != Namespace))
            p.Add($"{o}: namespace {o.Metadata?.NamespaceProperty ?? "(unset)"}, expected {Namespace}");
        // One-offs (the download, a sampling request, the samples reader) are their own kustomizations: in the deployment
        // they would run again, or block the apply (a finished Job's template cannot change), with every `kubectl apply -k`.
        foreach (var pod in set.Pods().Where(pod => pod.Owner.File == target))
        {
            var oneOff = pod.Owner.Kind == "Pod" || apps.All.Any(a => a.Container.Pod == pod && a.Exe == facts.CoordinatorExe && a.Invocation.Command.Name is "download" or "sample");
            if (oneOff) p.Add($"{pod.Owner}: a one-off belongs in its own kustomization under {RepoFiles.ManifestFolder}/jobs/, not in {target}");
        }
        foreach (var o in set.OfKind("Secret"))
            p.Add($"{o}: no Secret is committed; the token Secret is created by hand (docs/kubernetes.md)");
        foreach (var o in set.OfKind("ConfigMap"))
            foreach (var (k, v) in ((V1ConfigMap)o.Object).Data ?? new Dictionary<string, string>())
                if (k.Contains("TOKEN", StringComparison.OrdinalIgnoreCase)) p.Add($"{o}: {k}: the token does not go into a ConfigMap");
        // Settings come from a configMapGenerator: the name carries a hash of the content, so an edit changes the pod
        // template that names it (a Deployment rolls; a Job must be re-created) instead of going unnoticed.
        foreach (var c in set.Containers())
            foreach (var name in (c.Container.EnvFrom ?? []).Select(e => e.ConfigMapRef?.Name).Concat((c.Container.Env ?? []).Select(e => e.ValueFrom?.ConfigMapKeyRef?.Name)).OfType<string>())
                if (!GeneratedName().IsMatch(name))
                    p.Add($"{c}: reads the ConfigMap {name}, whose name has no content hash: make it with a configMapGenerator, so a change of settings reaches the pods");
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
            // Native gRPC probes call grpc.health.v1.Health/Check, the one method the coordinator serves without a token,
            // about "" (the process), a distdiffusion.v1 service, or the liveness service (no progress while training);
            // which port they must use (the cleartext health port beside TLS) is SecurityChecks' to say.
            if (probe.Grpc is null) p.Add($"{c}: the {kind} probe is not a gRPC (grpc.health.v1) probe");
            else if (!ports.Any(cp => cp.ContainerPort == probe.Grpc.Port))
                p.Add($"{c}: the {kind} probe checks port {probe.Grpc.Port}, which the container does not serve");
            else if (!string.IsNullOrEmpty(probe.Grpc.Service) && !probe.Grpc.Service.StartsWith("distdiffusion.v1.", StringComparison.Ordinal)
                     && probe.Grpc.Service != Coordinator.Monitoring.LivenessProbe.ServiceName)
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
            var requests = w.Container.Container.Resources?.Requests ?? new Dictionary<string, ResourceQuantity>();
            var spec = w.Container.Pod.Spec;
            var selectsPool = spec.NodeSelector?.TryGetValue(DeployFacts.GpuPoolLabel, out var pool) == true && pool == DeployFacts.GpuPoolValue;
            var tolerates = Tolerates(spec.Tolerations, DeployFacts.GpuTaintKey, DeployFacts.GpuTaintValue, DeployFacts.GpuTaintEffect);
            var device = w.Invocation.Value("--device");
            if (set.Pool == WorkerPool.Gpu)
            {
                if (!limits.TryGetValue(DeployFacts.GpuResource, out var gpus) || ManifestSchemaChecks.Quantity(gpus) != 1)
                    p.Add($"{w}: a worker takes exactly one GPU: limits.{DeployFacts.GpuResource} must be 1");
                if (!selectsPool) p.Add($"{w}: nodeSelector does not pick the GPU pool ({DeployFacts.GpuPoolLabel}={DeployFacts.GpuPoolValue})");
                if (!tolerates) p.Add($"{w}: does not tolerate the GPU pool's taint {DeployFacts.GpuTaintKey}={DeployFacts.GpuTaintValue}:{DeployFacts.GpuTaintEffect}");
                if (w.Image.Variant != "cuda") p.Add($"{w}: a GPU worker runs the cuda image variant, not '{w.Image.Variant}'");
                if (device is not null && device != "auto" && !device.StartsWith("cuda", StringComparison.Ordinal)) p.Add($"{w}: --device {device} on a GPU worker");
            }
            else
            {
                // A laptop cluster (kind, minikube) has no GPU, no device plugin and no GPU pool: any of them leaves the pod Pending.
                if (limits.ContainsKey(DeployFacts.GpuResource) || requests.ContainsKey(DeployFacts.GpuResource)) p.Add($"{w}: a CPU worker requests {DeployFacts.GpuResource}, which no node of a CPU cluster has");
                if (selectsPool) p.Add($"{w}: a CPU worker's nodeSelector picks the GPU pool ({DeployFacts.GpuPoolLabel}={DeployFacts.GpuPoolValue})");
                if (tolerates) p.Add($"{w}: a CPU worker tolerates the GPU taint");
                if (w.Image.Variant != facts.DefaultTorchDevice) p.Add($"{w}: a CPU worker runs the {facts.DefaultTorchDevice} image variant, not '{w.Image.Variant}'");
                if (device is not null && device.StartsWith("cuda", StringComparison.Ordinal)) p.Add($"{w}: --device {device} on a CPU worker");
            }
        }
        foreach (var c in set.Containers().Where(c => !workers.Any(w => w.Container == c)))
        {
            if (c.Container.Resources?.Limits?.ContainsKey(DeployFacts.GpuResource) == true || c.Container.Resources?.Requests?.ContainsKey(DeployFacts.GpuResource) == true)
                p.Add($"{c}: only workers use GPUs");
            if (Tolerates(c.Pod.Spec.Tolerations, DeployFacts.GpuTaintKey, DeployFacts.GpuTaintValue, DeployFacts.GpuTaintEffect))
                p.Add($"{c}: tolerates the GPU taint: it could take a GPU node's place");
        }
    }

    /// <summary>
    /// The coordinator: one `serve`. Training: a Job that completes with the run (no --keep-serving), whose replacement
    /// pod is made only once the old one has stopped, and whose failure policy fails at once on a usage error and does not
    /// count disruptions. Serving: a sample-only Deployment of one Recreate replica reading the checkpoint claim.
    /// </summary>
    private static void CheckCoordinator(ManifestSet set, DeployFacts facts, AppContainers apps, List<string> p)
    {
        var servers = apps.Running(facts.CoordinatorExe, "serve").ToList();
        if (servers.Count != 1)
        {
            p.Add($"expected exactly one container running `{facts.CoordinatorExe} serve`, found {servers.Count}");
            return;
        }
        var s = servers[0];
        var sampleOnly = s.Invocation.Has("--sample-only");
        if (set.Mode == DeployMode.Training)
        {
            if (sampleOnly) p.Add($"{s}: the training coordinator runs with --sample-only: it would train nothing");
            if (s.Invocation.Has("--keep-serving"))
                p.Add($"{s}: --keep-serving: the coordinator would not exit when training completes, so neither its Job nor the workers' (who wait for its word) would ever complete and free their pods");
            if (s.Container.Pod.Owner.Object is not V1Job job) p.Add($"{s}: the training coordinator runs as a Job (it completes with the run)");
            else
            {
                if (job.Spec.Completions is not (null or 1) || job.Spec.Parallelism is not (null or 1)) p.Add($"{s}: the coordinator Job needs completions 1 and parallelism 1 (one coordinator per run folder)");
                if (job.Spec.CompletionMode is "Indexed") p.Add($"{s}: the coordinator Job is not Indexed");
                CheckJobRestarts(s, job, s.Container.Container.Name, p);
            }
        }
        else
        {
            if (!sampleOnly) p.Add($"{s}: the serving coordinator needs --sample-only (it serves a finished run's weights)");
            if (s.Container.Pod.Owner.Object is not V1Deployment d) p.Add($"{s}: the serving coordinator runs as a Deployment (it serves until deleted)");
            else
            {
                if (d.Spec.Replicas != 1) p.Add($"{s}: the coordinator Deployment must have exactly 1 replica");
                if (d.Spec.Strategy?.Type != "Recreate") p.Add($"{s}: the coordinator Deployment must use the Recreate strategy (the old pod releases the ReadWriteOnce checkpoint volume first)");
            }
        }
        if (s.Image.Variant != facts.DefaultTorchDevice) p.Add($"{s}: the coordinator runs on a CPU node: image variant {facts.DefaultTorchDevice}, not {s.Image.Variant}");
        var required = s.Container.Pod.Spec.Affinity?.NodeAffinity?.RequiredDuringSchedulingIgnoredDuringExecution?.NodeSelectorTerms ?? [];
        var avoidsGpu = required.Count > 0 && required.All(t => (t.MatchExpressions ?? []).Any(e => e.Key == DeployFacts.GpuPoolLabel
            && ((e.OperatorProperty == "NotIn" && e.Values?.Contains(DeployFacts.GpuPoolValue) == true) || e.OperatorProperty == "DoesNotExist")));
        if (set.Pool == WorkerPool.Gpu && !avoidsGpu) p.Add($"{s}: the coordinator's required node affinity does not keep it off the GPU pool ({DeployFacts.GpuPoolLabel} NotIn [{DeployFacts.GpuPoolValue}])");
        var spec = s.Container.Pod.Spec;
        var folder = sampleOnly ? s.Invocation.Value("--checkpoint") : s.Invocation.Value("--resume");
        if (folder is not null && AppContainers.MountFor(s.Container, folder) is { } m)
        {
            var claim = (spec.Volumes ?? []).FirstOrDefault(v => v.Name == m.Name)?.PersistentVolumeClaim?.ClaimName;
            var pvc = set.All<V1PersistentVolumeClaim>().FirstOrDefault(x => x.Metadata?.Name == claim);
            if (pvc is null) p.Add($"{s}: {(sampleOnly ? "--checkpoint" : "--resume")} {folder} is not on a PersistentVolumeClaim: {(sampleOnly ? "it would serve no trained weights" : "a rescheduled coordinator would start over")}");
            else if (pvc.Spec.AccessModes?.Contains("ReadWriteOnce") != true && pvc.Spec.AccessModes?.Contains("ReadWriteOncePod") != true)
                p.Add($"{s}: the checkpoint claim {claim} should be ReadWriteOnce (one writer)");
            if (sampleOnly && m.ReadOnlyProperty != true) p.Add($"{s}: serving mounts the checkpoint volume {m.Name} writable: it only reads the trained run (mount it readOnly)");
        }
        else if (sampleOnly) p.Add($"{s}: --checkpoint {folder ?? "(none)"} is on no volume");
    }

    /// <summary>
    /// Workers. Training: one Indexed Job, completions = parallelism (all at once), that completes when every worker has
    /// exited 0, which a worker does when the coordinator ends the run (Finish without reconnect). Serving: a Deployment
    /// (scaled with `kubectl scale`) that never surges past the GPUs it has.
    /// </summary>
    private static void CheckWorkers(ManifestSet set, DeployFacts facts, AppContainers apps, List<string> p)
    {
        foreach (var w in apps.Running(facts.WorkerExe))
        {
            var owner = w.Container.Pod.Owner.Object;
            if (set.Mode == DeployMode.Training)
            {
                if (owner is not V1Job job)
                {
                    p.Add($"{w}: training workers run as a Job, which completes (and frees their GPUs) when the coordinator ends the run");
                    continue;
                }
                if (job.Spec.CompletionMode != "Indexed")
                    p.Add($"{w}: the worker Job is not Indexed: a non-indexed Job with parallelism stops replacing failed workers once any one has succeeded");
                if (job.Spec.Completions is not { } completions || job.Spec.Parallelism != completions || completions < 1)
                    p.Add($"{w}: the worker Job needs completions = parallelism >= 1 (every worker runs at once; got completions {job.Spec.Completions?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "unset"}, parallelism {job.Spec.Parallelism?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "unset"})");
                CheckJobRestarts(w, job, w.Container.Container.Name, p);
            }
            else if (owner is not V1Deployment d) p.Add($"{w}: serving workers run as a Deployment (they serve as long as the coordinator does; `kubectl scale` sizes them)");
            else if (set.Pool == WorkerPool.Gpu && d.Spec.Strategy?.RollingUpdate?.MaxSurge?.Value is not ("0" or "0%"))
                p.Add($"{w}: a GPU worker Deployment must roll with maxSurge 0: a surge pod would need a GPU of its own");
        }
    }

    /// <summary>What a run's Job does with a pod that ends: see deploy/k8s/base/coordinator.yaml.</summary>
    private static void CheckJobRestarts(AppContainer a, V1Job job, string container, List<string> p)
    {
        var spec = job.Spec;
        if (spec.Template.Spec.RestartPolicy != "Never") p.Add($"{a}: the run's Jobs need restartPolicy Never (a podFailurePolicy requires it)");
        if (spec.PodReplacementPolicy != "Failed")
            p.Add($"{a}: podReplacementPolicy is {spec.PodReplacementPolicy ?? "unset"}: with anything but Failed the Job starts a replacement while the old pod is still stopping (two coordinators on one run folder, or a worker waiting for a GPU the old one holds)");
        if (spec.ActiveDeadlineSeconds is not null) p.Add($"{a}: activeDeadlineSeconds {spec.ActiveDeadlineSeconds} would end a long run in the middle");
        if (spec.TtlSecondsAfterFinished is not null) p.Add($"{a}: ttlSecondsAfterFinished deletes the finished run's Job, and the next `kubectl apply -k` would start it again");
        if ((spec.BackoffLimitPerIndex ?? spec.BackoffLimit ?? 6) < 1) p.Add($"{a}: a backoff limit of 0 ends the run at the first crash");
        var rules = spec.PodFailurePolicy?.Rules ?? [];
        var failsOnUsage = rules.Any(r => r.Action == "FailJob" && r.OnExitCodes is { OperatorProperty: "In" } e
            && (e.ContainerName is null || e.ContainerName == container) && e.Values.Contains(DeployFacts.UsageExitCode));
        if (!failsOnUsage) p.Add($"{a}: no podFailurePolicy rule fails the Job on exit code {DeployFacts.UsageExitCode} (a bad flag or setting; retrying cannot help)");
        var ignoresDisruption = rules.Any(r => r.Action == "Ignore" && (r.OnPodConditions ?? []).Any(c => c.Type == "DisruptionTarget" && (c.Status ?? "True") == "True"));
        if (!ignoresDisruption) p.Add($"{a}: no podFailurePolicy rule ignores DisruptionTarget: every eviction, preemption or lost node would count against the backoff limit");
        foreach (var r in rules.Where(r => r.OnExitCodes is { } e && (e.ContainerName is null || e.ContainerName == container) && r.Action is "Ignore" or "Count" or "FailIndex" or "FailJob"))
            if (r.OnExitCodes.OperatorProperty == "In" && r.OnExitCodes.Values.Contains(0)) p.Add($"{a}: a podFailurePolicy rule names exit code 0, which is success");
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
