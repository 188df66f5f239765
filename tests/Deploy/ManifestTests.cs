using k8s.Models;

namespace DistDiffusion.Tests.Deploy;

/// <summary>deploy/k8s checked offline: against the Kubernetes API's types and rules, the deployment's rules, the code and the docs.</summary>
public sealed class ManifestTests
{
    private static readonly Lazy<DockerfileFacts> Docker = new(() => DockerfileChecks.FromRepo().Facts);

    internal static void AssertNone(IReadOnlyCollection<string> problems) =>
        Assert.True(problems.Count == 0, $"{problems.Count} problem(s):\n  " + string.Join("\n  ", problems));

    /// <summary>Every check that reads only the manifests, the code and the Dockerfile.</summary>
    private static List<string> AllProblems(ManifestSet set) =>
        ManifestSchemaChecks.Check(set)
            .Concat(ManifestPolicyChecks.Check(set, DeployFacts.Current, Docker.Value))
            .Concat(CodeCrossChecks.Check(set, DeployFacts.Current, Docker.Value))
            .Concat(SecurityChecks.Check(set, DeployFacts.Current, Docker.Value))
            .ToList();

    [Fact]
    public void Every_manifest_is_a_valid_Kubernetes_object()
    {
        var set = ManifestSet.FromRepo();
        Assert.True(set.Files.Count >= 6, $"expected the manifests under {RepoFiles.ManifestFolder}, found {set.Files.Count} files");
        AssertNone(ManifestSchemaChecks.Check(set));
    }

    [Fact]
    public void The_manifests_define_what_the_deployment_needs()
    {
        var set = ManifestSet.FromRepo();
        var kinds = set.Objects.GroupBy(o => o.Kind).ToDictionary(g => g.Key, g => g.Count());
        foreach (var kind in new[] { "Namespace", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy", "Job" })
            Assert.True(kinds.ContainsKey(kind), $"no {kind} in {RepoFiles.ManifestFolder}");
        var claims = set.All<V1PersistentVolumeClaim>().ToList();
        Assert.Contains(claims, c => c.Spec.AccessModes.Contains("ReadWriteOnce"));
        Assert.Contains(claims, c => c.Spec.AccessModes.Contains("ReadWriteMany") || c.Spec.AccessModes.Contains("ReadOnlyMany"));
        Assert.Empty(set.OfKind("Secret"));
    }

    [Fact]
    public void The_manifests_follow_the_deployment_rules()
    {
        // Resources on every container, gRPC probes where a container serves, the restricted security context,
        // one GPU per worker on the tainted GPU pool, one Recreate coordinator off that pool, and network policies.
        AssertNone(ManifestPolicyChecks.Check(ManifestSet.FromRepo(), DeployFacts.Current, Docker.Value));
    }

    [Fact]
    public void The_manifests_agree_with_the_code()
    {
        // Flags parsed by CoordinatorCli.Build() / WorkerCli.Build(), Names.DefaultPort, DISTDIFFUSION_ variables,
        // the ConfigMap bound by the coordinator's own Configure, the recipe's data folder on the dataset volume.
        AssertNone(CodeCrossChecks.Check(ManifestSet.FromRepo(), DeployFacts.Current, Docker.Value));
    }

    [Fact]
    public void The_manifests_use_TLS_and_separate_worker_and_client_tokens_by_default()
    {
        // https with a kubernetes.io/tls Secret (tls.crt, tls.key), probes on the cleartext health port, clients dialling
        // https with that Secret's ca.crt, the worker and client tokens from their own Secrets, no pod holding a credential
        // it has no use for.
        AssertNone(SecurityChecks.Check(ManifestSet.FromRepo(), DeployFacts.Current, Docker.Value));
    }

    [Fact]
    public void Every_container_command_runs_a_real_executable_with_real_flags()
    {
        var apps = AppContainers.Of(ManifestSet.FromRepo(), DeployFacts.Current, Docker.Value);
        AssertNone(apps.Problems.ToList());
        var verbs = apps.All.Select(a => a.Invocation.Verb).ToHashSet();
        foreach (var verb in new[] { "coordinator serve", "worker", "coordinator sample", "coordinator download" })
            Assert.Contains(verb, verbs);
    }

    [Fact]
    public void The_kubernetes_doc_agrees_with_the_code_and_the_manifests()
    {
        var set = ManifestSet.FromRepo();
        AssertNone(DocsChecks.Check(RepoFiles.Read(RepoFiles.KubernetesDoc), set, DeployFacts.Current, Docker.Value));
    }

    /// <summary>Each check really fails: the repository's manifests with one change each.</summary>
    [Theory]
    [InlineData("30-coordinator.yaml", "  replicas: 1", "  replica: 1", "not a valid Kubernetes object")]
    [InlineData("30-coordinator.yaml", "            periodSeconds: 20", "            periodSecond: 20", "not a valid Kubernetes object")]
    [InlineData("30-coordinator.yaml", "type: Recreate", "type: Recreat", "is not Recreate or RollingUpdate")]
    [InlineData("30-coordinator.yaml", "type: Recreate", "type: RollingUpdate", "must use the Recreate strategy")]
    [InlineData("30-coordinator.yaml", "- --keep-serving", "- --keep-servng", "has no option --keep-servng")]
    [InlineData("30-coordinator.yaml", "- --keep-serving", "- --log-level", "without --keep-serving")]
    [InlineData("30-coordinator.yaml", "- https://0.0.0.0:50051", "- https://0.0.0.0:50053", "--listen port 50053 is not 50051")]
    [InlineData("30-coordinator.yaml", "- https://0.0.0.0:50051", "- http://0.0.0.0:50051", "the coordinator must serve TLS")]
    [InlineData("30-coordinator.yaml", "            - --health-listen\n            - http://0.0.0.0:50054\n", "", "no --health-listen URL")]
    [InlineData("30-coordinator.yaml", "              port: 50054", "              port: 50051", "native gRPC probes speak no TLS")]
    [InlineData("30-coordinator.yaml", "            - --http\n            - https://0.0.0.0:50052\n", "", "no --http URL")]
    [InlineData("30-coordinator.yaml", "            - https://0.0.0.0:50052\n", "            - http://0.0.0.0:50052\n", "--http http://0.0.0.0:50052 is cleartext")]
    [InlineData("30-coordinator.yaml", "prometheus.io/port: \"50052\"", "prometheus.io/port: \"50051\"", "prometheus.io/port is 50051, but --http listens on 50052")]
    [InlineData("30-coordinator.yaml", "prometheus.io/scheme: https", "prometheus.io/scheme: http", "but --http speaks https")]
    [InlineData("30-coordinator.yaml", "        prometheus.io/scrape: \"true\"\n", "", "no prometheus.io/scrape")]
    [InlineData("50-network-policies.yaml", "              kubernetes.io/metadata.name: monitoring\n          podSelector:\n            matchLabels:\n              app.kubernetes.io/name: prometheus\n      ports:\n        - protocol: TCP\n          port: 50052",
        "              kubernetes.io/metadata.name: monitoring\n          podSelector:\n            matchLabels:\n              app.kubernetes.io/name: prometheus\n      ports:\n        - protocol: TCP\n          port: 50051", "lets more than labelled pods of this namespace")]
    [InlineData("50-network-policies.yaml", "              kubernetes.io/metadata.name: monitoring\n", "              team: monitoring\n", "no NetworkPolicy lets a monitoring namespace")]
    [InlineData("30-coordinator.yaml", "- --worker-token-file", "- --token-file", "one shared token for every role")]
    [InlineData("30-coordinator.yaml", "              - key: tls.crt", "              - key: cert.pem", "not 'tls.crt' (a kubernetes.io/tls Secret")]
    [InlineData("30-coordinator.yaml", "            secretName: distdiffusion-client-token", "            secretName: distdiffusion-worker-token", "come from the one Secret distdiffusion-worker-token")]
    [InlineData("30-coordinator.yaml", "      targetPort: grpc", "      targetPort: health", "exposes the cleartext health port")]
    [InlineData("50-network-policies.yaml", "          port: 50051", "          port: 50054", "reach the coordinator's cleartext health port")]
    [InlineData("30-coordinator.yaml", "- /app/coordinator", "- /app/coordinater", "none of the executables")]
    [InlineData("30-coordinator.yaml", "- /checkpoints/run", "- /tmp/run", "not on a PersistentVolumeClaim")]
    [InlineData("30-coordinator.yaml", "enableServiceLinks: false", "enableServiceLinks: true", "enableServiceLinks must be false")]
    [InlineData("30-coordinator.yaml", "targetPort: grpc", "targetPort: http", "targetPort http is no container port")]
    [InlineData("30-coordinator.yaml", "claimName: distdiffusion-checkpoints", "claimName: checkpoints", "which no manifest defines")]
    [InlineData("30-coordinator.yaml", "              memory: 8Gi", "              memory: 2Gi", "memory request 4Gi exceeds its limit 2Gi")]
    [InlineData("30-coordinator.yaml", "                    operator: NotIn", "                    operator: In", "does not keep it off the GPU pool")]
    [InlineData("10-config.yaml", "DISTDIFFUSION_Coordinator__MinWorkers:", "DISTDIFFUSION_Coordinator__MinWorker:", "MinWorker is no setting of CoordinatorOptions")]
    [InlineData("10-config.yaml", "DISTDIFFUSION_Coordinator__MinWorkers: \"2\"", "DISTDIFFUSION_Coordinator__MinWorkers: \"0\"", "rejects its configuration")]
    [InlineData("10-config.yaml", "DISTDIFFUSION_Coordinator__Recipe: mnist-ddpm", "DISTDIFFUSION_Coordinator__Recipe: mnist-dddpm", "unknown recipe")]
    [InlineData("10-config.yaml", "DISTDIFFUSION_Coordinator__Recipe: mnist-ddpm", "DISTDIFFUSION_Coordinator__Recipe: fashion-mnist-annotated", "no Job downloads it")]
    [InlineData("40-workers.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "readOnlyRootFilesystem is not true")]
    [InlineData("40-workers.yaml", "              nvidia.com/gpu: \"1\"\n", "", "exactly one GPU")]
    [InlineData("40-workers.yaml", "operator: Exists", "operator: Equal", "does not tolerate the GPU pool's taint")]
    [InlineData("40-workers.yaml", "distdiffusion/pool: gpu", "distdiffusion/pool: cpu", "nodeSelector does not pick the GPU pool")]
    [InlineData("40-workers.yaml", "image: distdiffusion:0.1.0-cuda", "image: distdiffusion:latest", "is not <repository>:<version>-<variant>")]
    [InlineData("40-workers.yaml", "image: distdiffusion:0.1.0-cuda", "image: distdiffusion:0.1.0-cpu", "runs the cuda image variant")]
    [InlineData("40-workers.yaml", "- https://distdiffusion-coordinator:50051", "- https://coordinator:50051", "is no Service of these manifests")]
    [InlineData("40-workers.yaml", "- /var/run/secrets/distdiffusion/worker/token", "- /tmp/token", "is not on a mounted Secret")]
    [InlineData("40-workers.yaml", "- https://distdiffusion-coordinator:50051", "- http://distdiffusion-coordinator:50051", "cleartext; the coordinator's address is https://")]
    [InlineData("40-workers.yaml", "            - --tls-ca\n            - /var/run/secrets/distdiffusion/ca/ca.crt\n", "", "no --tls-ca")]
    [InlineData("40-workers.yaml", "            secretName: distdiffusion-worker-token", "            secretName: distdiffusion-client-token", "not the worker token Secret distdiffusion-worker-token")]
    [InlineData("40-workers.yaml", "              - key: ca.crt", "              - key: tls.key", "mounts the coordinator's private key")]
    [InlineData("jobs/sample.yaml", "            secretName: distdiffusion-client-token", "            secretName: distdiffusion-worker-token", "not the client token Secret distdiffusion-client-token")]
    [InlineData("40-workers.yaml", "              drop:\n                - ALL", "              drop:\n                - NET_RAW", "does not drop ALL capabilities")]
    [InlineData("40-workers.yaml", "runAsUser: 1654", "runAsUser: 1000", "differs from the image's USER 1654")]
    [InlineData("40-workers.yaml", "            - name: tmp\n              mountPath: /tmp\n", "", "without a writable emptyDir at /tmp")]
    [InlineData("40-workers.yaml", "              memory: 16Gi\n", "", "no memory request")]
    [InlineData("50-network-policies.yaml", "                  - worker\n                  - sampler\n      ports:", "                  - sampler\n      ports:", "do not let it reach port 50051")]
    [InlineData("50-network-policies.yaml", "  podSelector: {}\n  policyTypes:\n    - Ingress\n    - Egress", "  podSelector: {}\n  policyTypes:\n    - Ingress", "no default-deny NetworkPolicy")]
    [InlineData("50-network-policies.yaml", "          port: 53", "          port: 5353", "may not send DNS queries")]
    [InlineData("jobs/download-mnist.yaml", "- /data/mnist", "- /data/mnist2", "but the recipe's data is read from /data/mnist")]
    [InlineData("jobs/sample.yaml", "- /samples/grid.png", "- /tmp/grid.png", "not on a PersistentVolumeClaim")]
    [InlineData("jobs/sample.yaml", "restartPolicy: Never", "restartPolicy: Always", "need restartPolicy Never or OnFailure")]
    [InlineData("00-namespace.yaml", "enforce: restricted", "enforce: baseline", "restricted Pod Security Standard")]
    public void A_broken_manifest_is_reported(string file, string oldText, string newText, string expected)
    {
        var problems = AllProblems(ManifestSet.FromRepoWith(file, oldText, newText));
        Assert.True(problems.Any(p => p.Contains(expected, StringComparison.Ordinal)),
            $"no problem mentions '{expected}'; got:\n  " + string.Join("\n  ", problems));
    }

    [Theory]
    [InlineData("kubectl -n distdiffusion create secret generic dd-token --from-file=token=./token", "not dd-token")]
    [InlineData("kubectl -n distdiffusion create secret tls distdiffusion-tls --cert=tls.crt --key=tls.key", "the pods read the key 'ca.crt' of Secret distdiffusion-tls")]
    [InlineData("kubectl -n distdiffusion scale deployment/distdiffusion-workers --replicas=4", "no Deployment distdiffusion-workers")]
    [InlineData("coordinator status --address http://127.0.0.1:50051 --token ./token", "has no option --token")]
    [InlineData("worker --coordinator http://127.0.0.1:50051 --gpu 0", "has no option --gpu")]
    [InlineData("docker build -f deploy/docker/Dockerfile --build-arg TORCH_DEVICE=rocm -t distdiffusion:0.1.0-rocm .", "must be one of")]
    [InlineData("kubectl taint nodes n1 nvidia.com/gpu=true:NoSchedule", "the GPU pool taint is")]
    public void A_wrong_command_in_the_doc_is_reported(string command, string expected)
    {
        var doc = RepoFiles.Read(RepoFiles.KubernetesDoc) + "\n```sh\n" + command + "\n```\n";
        var problems = DocsChecks.Check(doc, ManifestSet.FromRepo(), DeployFacts.Current, Docker.Value);
        Assert.True(problems.Any(p => p.Contains(expected, StringComparison.Ordinal)), $"no problem mentions '{expected}'; got:\n  " + string.Join("\n  ", problems));
    }
}
