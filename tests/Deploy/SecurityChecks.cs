using k8s.Models;

namespace DistDiffusion.Tests.Deploy;

/// <summary>
/// TLS and roles are the manifests' default: the coordinator serves https with a certificate from a kubernetes.io/tls
/// Secret (tls.crt, tls.key: cert-manager's layout) and gives the probes a cleartext health port; every client dials
/// https and verifies the certificate with that Secret's ca.crt; workers hold the worker token and clients the client
/// token, each from its own Secret, and no pod mounts a credential it has no use for.
/// </summary>
internal static class SecurityChecks
{
    public const string CertKey = "tls.crt";
    public const string PrivateKeyKey = "tls.key";
    public const string CaKey = "ca.crt";

    public static List<string> Check(ManifestSet set, DeployFacts facts, DockerfileFacts docker)
    {
        var p = new List<string>();
        var apps = AppContainers.Of(set, facts, docker);
        var server = apps.Running(facts.CoordinatorExe, "serve").FirstOrDefault();
        if (server is null) return p;   // CodeCrossChecks reports it
        var inv = server.Invocation;

        var listen = inv.Value("--listen");
        if (listen is null || !listen.StartsWith("https://", StringComparison.Ordinal))
            p.Add($"{server}: --listen {listen}: the coordinator must serve TLS (https://): tokens, parameters and gradients cross the pod network");
        var cert = Required(server, "--tls-cert", CertKey, p);
        var key = Required(server, "--tls-key", PrivateKeyKey, p);
        if (cert is { } c && key is { } k && c.Secret != k.Secret)
            p.Add($"{server}: --tls-cert is from Secret {c.Secret} but --tls-key from {k.Secret}: one kubernetes.io/tls Secret holds both");
        var tlsSecret = cert?.Secret;

        CheckHealthPort(server, set, facts, p);
        // The metrics port carries the client token: TLS like the gRPC port.
        if (server.Invocation.Value("--http") is { } http && !http.StartsWith("https://", StringComparison.Ordinal))
            p.Add($"{server}: --http {http} is cleartext: the client token would cross the pod network unencrypted (use https:// with the same certificate)");

        if (inv.Has("--token-file"))
            p.Add($"{server}: --token-file is one shared token for every role: give --worker-token-file and --client-token-file instead, so a client cannot join as a worker");
        var workerSecret = Required(server, "--worker-token-file", "token", p)?.Secret;
        var clientSecret = Required(server, "--client-token-file", "token", p)?.Secret;
        if (workerSecret is not null && workerSecret == clientSecret)
            p.Add($"{server}: the worker and client tokens come from the one Secret {workerSecret}: a client could join as a worker");

        foreach (var a in apps.All.Where(a => a.CoordinatorUrl is not null))
        {
            var isWorker = a.Exe == facts.WorkerExe;
            var (role, mine, other, otherRole) = isWorker ? ("worker", workerSecret, clientSecret, "client") : ("client", clientSecret, workerSecret, "worker");
            if (!a.CoordinatorUrl!.StartsWith("https://", StringComparison.Ordinal))
                p.Add($"{a}: dials {a.CoordinatorUrl}: cleartext; the coordinator's address is https://");
            var ca = Required(a, "--tls-ca", CaKey, p);
            if (ca is { } caFile && tlsSecret is not null && caFile.Secret != tlsSecret)
                p.Add($"{a}: --tls-ca is from Secret {caFile.Secret}, not the coordinator's TLS Secret {tlsSecret} (whose {CaKey} signed its certificate)");
            var token = Required(a, "--token-file", "token", p);
            if (token is { } t && mine is not null && t.Secret != mine)
                p.Add($"{a}: --token-file is from Secret {t.Secret}, not the {role} token Secret {mine} the coordinator reads with --{role}-token-file");
            foreach (var v in a.Container.Pod.Spec.Volumes ?? [])
            {
                if (v.Secret is null) continue;
                if (other is not null && v.Secret.SecretName == other)
                    p.Add($"{a.Container.Pod}: mounts Secret {other}, the {otherRole} token, which a {role} has no use for");
                if (tlsSecret is not null && v.Secret.SecretName == tlsSecret && (v.Secret.Items is null || v.Secret.Items.Any(i => i.Key == PrivateKeyKey)))
                    p.Add($"{a.Container.Pod}: mounts the coordinator's private key ({PrivateKeyKey} of Secret {tlsSecret}); project only {CaKey} (items)");
            }
        }
        return p;
    }

    /// <summary>The Secret file <paramref name="flag"/> names, which must be the key <paramref name="key"/>; null (with a problem) otherwise.</summary>
    private static (string Secret, string Key)? Required(AppContainer a, string flag, string key, List<string> p)
    {
        var path = a.Invocation.Value(flag);
        if (path is null)
        {
            p.Add(flag switch
            {
                "--tls-ca" => $"{a}: no --tls-ca: it would trust the system store only, which does not hold the cluster's private CA ({CaKey} of the coordinator's TLS Secret)",
                _ => $"{a}: no {flag}",
            });
            return null;
        }
        var file = CodeCrossChecks.SecretFile(a, path);
        if (file is null)
        {
            p.Add($"{a}: {flag} {path} is not on a mounted Secret");
            return null;
        }
        if (file.Value.Key != key)
        {
            p.Add($"{a}: {flag} {path} is the key '{file.Value.Key}' of Secret {file.Value.Secret}, not '{key}'{(key.StartsWith("tls.", StringComparison.Ordinal) || key == CaKey ? " (a kubernetes.io/tls Secret, as cert-manager writes it)" : "")}");
            return null;
        }
        return file;
    }

    private static void CheckHealthPort(AppContainer server, ManifestSet set, DeployFacts facts, List<string> p)
    {
        var container = server.Container.Container;
        var health = server.Invocation.Value("--health-listen");
        if (health is null || !Uri.TryCreate(health, UriKind.Absolute, out var uri))
        {
            p.Add($"{server}: no --health-listen URL: native gRPC probes speak no TLS, so they need the cleartext health port");
            return;
        }
        if (uri.Scheme != Uri.UriSchemeHttp) p.Add($"{server}: --health-listen {health}: the probes' port is cleartext (http://)");
        if (uri.Host is not ("0.0.0.0" or "[::]")) p.Add($"{server}: --health-listen {health}: the kubelet dials the pod's address, so listen on all interfaces");
        if (uri.Port != facts.DefaultHealthPort) p.Add($"{server}: --health-listen port {uri.Port} is not {facts.DefaultHealthPort} (Names.DefaultHealthPort)");
        if (!(container.Ports ?? []).Any(cp => cp.ContainerPort == uri.Port)) p.Add($"{server}: the health port {uri.Port} is no containerPort");
        foreach (var (kind, probe) in new[] { ("liveness", container.LivenessProbe), ("readiness", container.ReadinessProbe), ("startup", container.StartupProbe) })
            if (probe?.Grpc is { } grpc && grpc.Port != uri.Port)
                p.Add($"{server}: the {kind} probe checks port {grpc.Port}: native gRPC probes speak no TLS; probe the health port {uri.Port}");
        var healthPortNames = (container.Ports ?? []).Where(cp => cp.ContainerPort == uri.Port).Select(cp => cp.Name).ToHashSet();
        foreach (var service in set.All<V1Service>())
            foreach (var port in service.Spec.Ports ?? [])
                if (port.TargetPort?.Value is { } target && (target == uri.Port.ToString(System.Globalization.CultureInfo.InvariantCulture) || healthPortNames.Contains(target)))
                    p.Add($"Service {service.Metadata.Name}: exposes the cleartext health port {uri.Port}, which only the kubelet needs");
    }
}
