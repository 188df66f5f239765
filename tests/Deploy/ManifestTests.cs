using k8s.Models;

namespace DistDiffusion.Tests.Deploy;

/// <summary>
/// deploy/k8s checked offline, as kustomize renders it (`kubectl kustomize`, the build `kubectl apply -k` applies): every
/// overlay against the Kubernetes API's types and rules, the deployment's rules, the code and the docs.
/// </summary>
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

    public static TheoryData<string> Targets() => new(DeployTarget.All.Select(t => t.Name));

    private static ManifestSet Set(string target) => ManifestSet.FromRepo(DeployTarget.Named(target));

    [KustomizeTheory]
    [MemberData(nameof(Targets))]
    public void Every_rendered_object_is_a_valid_Kubernetes_object(string target)
    {
        var set = Set(target);
        Assert.True(set.Objects.Count >= 10, $"expected the objects of {DeployTarget.Named(target).Dir}, rendered {set.Objects.Count}");
        AssertNone(ManifestSchemaChecks.Check(set));
    }

    [KustomizeFact]
    public void Every_kustomization_under_deploy_k8s_is_rendered_by_these_tests()
    {
        var checkedDirs = DeployTarget.All.SelectMany(t => t.Dirs).Concat(DeployTarget.Aliases.Select(a => a.Dir)).Concat(DeployTarget.Bases)
            .Concat(DeployTarget.Setups.Select(s => s.Dir)).ToHashSet(StringComparer.Ordinal);
        var all = RepoFiles.Kustomizations();
        var components = all.Where(k => k.Kind == "Component").Select(k => k.Dir).ToList();
        foreach (var (dir, kind) in all.Where(k => k.Kind != "Component"))
        {
            Assert.True(kind == "Kustomization", $"{dir}/{RepoFiles.Kustomization}: kind {kind}");
            // overlays/gpu and overlays/gpu-serving are what deploy/k8s and deploy/k8s/serving point at.
            Assert.True(checkedDirs.Contains(dir), $"{dir} is a kustomization no test renders: add it to DeployTarget");
        }
        foreach (var (alias, target) in DeployTarget.Aliases)
            Assert.Equal(Kustomize.Render(RepoFiles.Root, target.Dir).Yaml, Kustomize.Render(RepoFiles.Root, alias).Yaml);
        // Every component is part of some target's build.
        var texts = all.Select(k => File.ReadAllText(RepoFiles.PathOf(k.Dir + "/" + RepoFiles.Kustomization))).ToList();
        foreach (var c in components)
            Assert.True(texts.Any(t => t.Contains("components/" + c.Split('/')[^1] + "\n", StringComparison.Ordinal)), $"no kustomization uses the component {c}");
    }

    [KustomizeFact]
    public void Each_setup_renders_the_very_objects_its_overlays_apply_later()
    {
        foreach (var (dir, targets) in DeployTarget.Setups)
        {
            var setup = ManifestSet.Load([(dir, Kustomize.Render(RepoFiles.Root, dir).Yaml ?? throw new InvalidOperationException(Kustomize.Render(RepoFiles.Root, dir).Error))]);
            AssertNone(ManifestSchemaChecks.Check(setup));
            Assert.Contains(setup.Objects, o => o.Kind == "Namespace");
            Assert.Contains(setup.Objects, o => o.Kind == "PersistentVolumeClaim");
            foreach (var target in targets)
            {
                var later = ManifestSet.FromRepo(target);
                foreach (var o in setup.Objects)
                {
                    var same = later.Objects.SingleOrDefault(x => x.Kind == o.Kind && x.Name == o.Name && x.File == target.Dir);
                    Assert.True(same is not null, $"{dir} renders {o.Kind} {o.Name}, which {target.Dir} does not");
                    Assert.Equal(k8s.KubernetesYaml.Serialize(o.Object), k8s.KubernetesYaml.Serialize(same!.Object));
                }
            }
        }
    }

    [KustomizeTheory]
    [MemberData(nameof(Targets))]
    public void The_manifests_define_what_the_deployment_needs(string target)
    {
        var set = Set(target);
        var kinds = set.Objects.GroupBy(o => o.Kind).ToDictionary(g => g.Key, g => g.Count());
        foreach (var kind in new[] { "Namespace", "ConfigMap", "PersistentVolumeClaim", "Service", "NetworkPolicy", "Job" })
            Assert.True(kinds.ContainsKey(kind), $"no {kind} in {set.Target!.Dir}");
        if (set.Mode == DeployMode.Serving) Assert.True(kinds.ContainsKey("Deployment"), $"no Deployment in {set.Target!.Dir}");
        var claims = set.All<V1PersistentVolumeClaim>().ToList();
        Assert.Contains(claims, c => c.Spec.AccessModes.Contains("ReadWriteOnce"));
        // The dataset claim is mounted on every worker's node: ReadWriteMany, except on a one-node laptop cluster.
        if (set.Pool == WorkerPool.Gpu) Assert.Contains(claims, c => c.Spec.AccessModes.Contains("ReadWriteMany") || c.Spec.AccessModes.Contains("ReadOnlyMany"));
        Assert.Empty(set.OfKind("Secret"));
    }

    [KustomizeTheory]
    [MemberData(nameof(Targets))]
    public void The_manifests_follow_the_deployment_rules(string target)
    {
        // Resources on every container, gRPC probes where a container serves, the restricted security context, one GPU per
        // worker on the tainted GPU pool (none on a CPU cluster), the run's Jobs that complete with it (or, serving, one
        // Recreate sample-only coordinator), generated ConfigMaps, and network policies.
        AssertNone(ManifestPolicyChecks.Check(Set(target), DeployFacts.Current, Docker.Value));
    }

    [KustomizeTheory]
    [MemberData(nameof(Targets))]
    public void The_manifests_agree_with_the_code(string target)
    {
        // Flags parsed by CoordinatorCli.Build() / WorkerCli.Build(), Names.DefaultPort, DISTDIFFUSION_ variables, the
        // ConfigMap bound by the coordinator's own Configure, the recipe's data folder on the dataset volume.
        AssertNone(CodeCrossChecks.Check(Set(target), DeployFacts.Current, Docker.Value));
    }

    [KustomizeTheory]
    [MemberData(nameof(Targets))]
    public void The_manifests_use_TLS_and_separate_worker_and_client_tokens_by_default(string target)
    {
        // https with a kubernetes.io/tls Secret (tls.crt, tls.key), probes on the cleartext health port, clients dialling
        // https with that Secret's ca.crt, the worker and client tokens from their own Secrets, no pod holding a credential
        // it has no use for.
        AssertNone(SecurityChecks.Check(Set(target), DeployFacts.Current, Docker.Value));
    }

    [KustomizeTheory]
    [MemberData(nameof(Targets))]
    public void Every_container_command_runs_a_real_executable_with_real_flags(string target)
    {
        var set = Set(target);
        var apps = AppContainers.Of(set, DeployFacts.Current, Docker.Value);
        AssertNone(apps.Problems.ToList());
        var verbs = apps.All.Select(a => a.Invocation.Verb).ToHashSet();
        foreach (var verb in set.Mode == DeployMode.Training ? ["coordinator serve", "worker", "coordinator sample", "coordinator download"] : new[] { "coordinator serve", "worker", "coordinator sample" })
            Assert.Contains(verb, verbs);
    }

    [KustomizeTheory]
    [InlineData("gpu", "cuda")]
    [InlineData("cpu", "cpu")]
    [InlineData("gpu-serving", "cuda")]
    [InlineData("cpu-serving", "cpu")]
    public void The_overlay_picks_the_node_pool_and_image_of_its_workers(string target, string variant)
    {
        var set = Set(target);
        var apps = AppContainers.Of(set, DeployFacts.Current, Docker.Value);
        var workers = apps.Running(DeployFacts.Current.WorkerExe).ToList();
        Assert.NotEmpty(workers);
        foreach (var w in workers)
        {
            Assert.Equal(variant, w.Image.Variant);
            var gpus = w.Container.Container.Resources?.Limits?.TryGetValue(DeployFacts.GpuResource, out var q) == true ? ManifestSchemaChecks.Quantity(q) : null;
            Assert.Equal(variant == "cuda" ? 1m : null, gpus);
            string? pool = null;
            w.Container.Pod.Spec.NodeSelector?.TryGetValue(DeployFacts.GpuPoolLabel, out pool);
            Assert.Equal(variant == "cuda" ? DeployFacts.GpuPoolValue : null, pool);
        }
        // Everything else runs the cpu build, and all of one build.
        Assert.All(apps.All.Where(a => a.Exe != DeployFacts.Current.WorkerExe), a => Assert.Equal(DeployFacts.Current.DefaultTorchDevice, a.Image.Variant));
        Assert.Single(apps.All.Select(a => (a.Image.Repository, a.Image.Tag)).Distinct());
    }

    [KustomizeFact]
    public void A_registry_set_once_in_the_images_component_reaches_every_container_of_every_target()
    {
        foreach (var target in DeployTarget.All)
        {
            var set = ManifestSet.FromRepoWith(target, "components/images/kustomization.yaml", "    newName: distdiffusion\n", "    newName: registry.example/ml/distdiffusion\n");
            var images = set.Containers().Select(c => c.Container.Image).Distinct().ToList();
            Assert.NotEmpty(images);
            Assert.All(images, i => Assert.Matches(@"^registry\.example/ml/distdiffusion:0\.1\.0-(cpu|cuda)$", i));
        }
    }

    [KustomizeTheory]
    [InlineData("gpu", "base/run.env", "DISTDIFFUSION_Coordinator__KeepCheckpoints=5", "DISTDIFFUSION_Coordinator__KeepCheckpoints=6")]
    [InlineData("cpu", "components/cpu/kustomization.yaml", "DISTDIFFUSION_Coordinator__Threads=1", "DISTDIFFUSION_Coordinator__Threads=2")]
    [InlineData("gpu-serving", "components/serving/serving.env", "DISTDIFFUSION_Coordinator__SampleWaitSeconds=120", "DISTDIFFUSION_Coordinator__SampleWaitSeconds=60")]
    public void A_settings_change_gives_the_coordinator_pod_template_another_ConfigMap_name(string target, string file, string oldText, string newText)
    {
        static string Referenced(ManifestSet set)
        {
            var server = AppContainers.Of(set, DeployFacts.Current, Docker.Value).Running(DeployFacts.Current.CoordinatorExe, "serve").Single();
            var name = Assert.Single(server.Container.Container.EnvFrom, e => e.ConfigMapRef is not null).ConfigMapRef.Name;
            Assert.Contains(set.All<V1ConfigMap>(), c => c.Metadata.Name == name);
            return name;
        }
        var t = DeployTarget.Named(target);
        var before = Referenced(ManifestSet.FromRepo(t));
        var after = Referenced(ManifestSet.FromRepoWith(t, file, oldText, newText));
        Assert.NotEqual(before, after);
        Assert.Equal(before[..before.LastIndexOf('-')], after[..after.LastIndexOf('-')]);
    }

    [KustomizeTheory]
    [InlineData("gpu")]
    [InlineData("cpu")]
    public void A_training_run_is_two_Jobs_that_complete_when_the_coordinator_ends_the_run(string target)
    {
        var set = Set(target);
        var apps = AppContainers.Of(set, DeployFacts.Current, Docker.Value);
        var server = apps.Running(DeployFacts.Current.CoordinatorExe, "serve").Single();
        var coordinator = Assert.IsType<V1Job>(server.Container.Pod.Owner.Object);
        // serve exits 0 once training completes unless told to keep serving (TrainingLoop), after telling each worker so.
        Assert.False(server.Invocation.Has("--keep-serving"));
        Assert.Equal(1, coordinator.Spec.Completions ?? 1);
        Assert.Equal("Failed", coordinator.Spec.PodReplacementPolicy);
        var workerJobs = apps.Running(DeployFacts.Current.WorkerExe).Select(w => Assert.IsType<V1Job>(w.Container.Pod.Owner.Object)).Distinct().ToList();
        var workers = Assert.Single(workerJobs);
        Assert.Equal("Indexed", workers.Spec.CompletionMode);
        Assert.Equal(workers.Spec.Completions, workers.Spec.Parallelism);
        Assert.Empty(set.OfKind("Deployment"));
    }

    /// <summary>Serving reads what training wrote: the same claim and folder, read-only, behind the same Service.</summary>
    [KustomizeTheory]
    [InlineData("gpu", "gpu-serving")]
    [InlineData("cpu", "cpu-serving")]
    public void Serving_reads_the_checkpoints_of_the_training_run_behind_the_same_Service(string training, string serving)
    {
        AssertNone(ServingReadsTraining(Set(training), Set(serving)));
    }

    [KustomizeFact]
    public void Serving_another_folder_than_training_wrote_is_reported()
    {
        var serving = ManifestSet.FromRepoWith(DeployTarget.GpuServing, "components/serving/serving.yaml", "            - --checkpoint\n            - /checkpoints/run\n", "            - --checkpoint\n            - /checkpoints/run2\n");
        var problems = ServingReadsTraining(Set("gpu"), serving);
        Assert.Contains(problems, p => p.Contains("serves /checkpoints/run2", StringComparison.Ordinal));
    }

    private static List<string> ServingReadsTraining(ManifestSet training, ManifestSet serving)
    {
        var p = new List<string>();
        var trainer = AppContainers.Of(training, DeployFacts.Current, Docker.Value).Running(DeployFacts.Current.CoordinatorExe, "serve").Single();
        var server = AppContainers.Of(serving, DeployFacts.Current, Docker.Value).Running(DeployFacts.Current.CoordinatorExe, "serve").Single();
        var (written, read) = (trainer.Invocation.Value("--resume"), server.Invocation.Value("--checkpoint"));
        static string? Claim(AppContainer a, string? path) =>
            path is not null && AppContainers.MountFor(a.Container, path) is { } m ? AppContainers.VolumeOf(a.Container, m)?.PersistentVolumeClaim?.ClaimName : null;
        if (written != read) p.Add($"{serving.Target!.Dir}: serves {read}, but training writes its run to {written}");
        if (Claim(trainer, written) is not { } claim || Claim(server, read) != claim) p.Add($"{serving.Target!.Dir}: serves from claim {Claim(server, read)}, training writes to {Claim(trainer, written)}");
        foreach (var service in training.All<V1Service>())
            if (!service.Spec.Selector.All(kv => server.Container.Pod.Labels.TryGetValue(kv.Key, out var v) && v == kv.Value))
                p.Add($"{serving.Target!.Dir}: the Service {service.Metadata.Name} does not select the serving coordinator: the certificate, the sampling Job and port-forward would not reach it");
        foreach (var job in training.OfKind("Job").Where(j => j.File == training.Target!.Dir))
            if (serving.Objects.Any(o => o.Kind == "Job" && o.Name == job.Name))
                p.Add($"{serving.Target!.Dir}: still holds the training Job {job.Name}");
        return p;
    }

    [KustomizeFact]
    public void The_kubernetes_doc_agrees_with_the_code_and_the_manifests()
    {
        AssertNone(DocsChecks.Check(RepoFiles.Read(RepoFiles.KubernetesDoc), ManifestSet.AllFromRepo(), DeployFacts.Current, Docker.Value));
    }

    private const string Coordinator = "base/coordinator.yaml";
    private const string Workers = "base/workers.yaml";
    private const string Policies = "setup/network-policies.yaml";
    private const string Run = "base/run.env";
    private const string Base = "base/kustomization.yaml";
    private const string GpuWorker = "components/gpu/worker-gpu.yaml";
    private const string CpuWorker = "components/cpu/worker-cpu.yaml";
    private const string Serving = "components/serving/serving.yaml";
    private const string Images = "components/images/kustomization.yaml";
    private const string Download = "jobs/download-mnist/job.yaml";
    private const string Sample = "jobs/sample/job.yaml";

    /// <summary>Each check really fails: a target rendered from a copy of deploy/k8s with one change each.</summary>
    [KustomizeTheory]
    [InlineData("gpu", Coordinator, "  completions: 1", "  completion: 1", "not a valid Kubernetes object")]
    [InlineData("gpu", Coordinator, "            periodSeconds: 20", "            periodSecond: 20", "not a valid Kubernetes object")]
    [InlineData("gpu", Base, "  - workers.yaml\n", "  - worker.yaml\n", "`kubectl kustomize deploy/k8s` failed")]
    [InlineData("gpu-serving", Serving, "type: Recreate", "type: Recreat", "is not Recreate or RollingUpdate")]
    [InlineData("gpu-serving", Serving, "type: Recreate", "type: RollingUpdate", "must use the Recreate strategy")]
    [InlineData("gpu-serving", Serving, "            - --sample-only\n", "", "needs --sample-only")]
    [InlineData("gpu-serving", Serving, "              mountPath: /checkpoints\n              readOnly: true\n", "              mountPath: /checkpoints\n", "mounts the checkpoint volume checkpoints writable")]
    [InlineData("gpu", Coordinator, "            - /checkpoints/run\n", "            - /checkpoints/run\n            - --keep-servng\n", "has no option --keep-servng")]
    [InlineData("gpu", Coordinator, "            - /checkpoints/run\n", "            - /checkpoints/run\n            - --keep-serving\n", "neither its Job nor the workers'")]
    [InlineData("gpu", Run, "DISTDIFFUSION_Coordinator__KeepCheckpoints=5\n", "DISTDIFFUSION_Coordinator__KeepCheckpoints=5\nDISTDIFFUSION_Coordinator__KeepServing=true\n", "keeps serving after training")]
    [InlineData("gpu", Coordinator, "  podReplacementPolicy: Failed", "  podReplacementPolicy: TerminatingOrFailed", "podReplacementPolicy is TerminatingOrFailed")]
    [InlineData("gpu", Coordinator, "  parallelism: 1", "  parallelism: 2", "needs completions 1 and parallelism 1")]
    [InlineData("gpu", Coordinator, "          values:\n            - 2", "          values:\n            - 1", "fails the Job on exit code 2")]
    [InlineData("gpu", Coordinator, "      restartPolicy: Never", "      restartPolicy: OnFailure", "need restartPolicy Never")]
    [InlineData("gpu", Workers, "  completionMode: Indexed\n", "", "the worker Job is not Indexed")]
    [InlineData("gpu", Workers, "  parallelism: 2", "  parallelism: 1", "needs completions = parallelism")]
    [InlineData("cpu", Workers, "      - action: Ignore\n        onPodConditions:\n          - type: DisruptionTarget\n", "", "ignores DisruptionTarget")]
    [InlineData("gpu", Workers, "  backoffLimitPerIndex: 5\n", "  backoffLimitPerIndex: 5\n  activeDeadlineSeconds: 86400\n", "would end a long run")]
    [InlineData("gpu", Workers, "  backoffLimitPerIndex: 5\n", "  backoffLimitPerIndex: 5\n  ttlSecondsAfterFinished: 600\n", "would start it again")]
    [InlineData("gpu", Run, "DISTDIFFUSION_Coordinator__MinWorkers=2", "DISTDIFFUSION_Coordinator__MinWorkers=3", "the run would never start")]
    [InlineData("gpu", Coordinator, "- https://0.0.0.0:50051", "- https://0.0.0.0:50053", "--listen port 50053 is not 50051")]
    [InlineData("gpu", Coordinator, "- https://0.0.0.0:50051", "- http://0.0.0.0:50051", "the coordinator must serve TLS")]
    [InlineData("gpu", Coordinator, "            - --health-listen\n            - http://0.0.0.0:50054\n", "", "no --health-listen URL")]
    [InlineData("gpu", Coordinator, "              port: 50054", "              port: 50051", "native gRPC probes speak no TLS")]
    [InlineData("gpu-serving", Serving, "              port: 50054", "              port: 50051", "native gRPC probes speak no TLS")]
    [InlineData("gpu", Coordinator, "            - --http\n            - https://0.0.0.0:50052\n", "", "no --http URL")]
    [InlineData("gpu", Coordinator, "            - https://0.0.0.0:50052\n", "            - http://0.0.0.0:50052\n", "--http http://0.0.0.0:50052 is cleartext")]
    [InlineData("gpu", Coordinator, "prometheus.io/port: \"50052\"", "prometheus.io/port: \"50051\"", "prometheus.io/port is 50051, but --http listens on 50052")]
    [InlineData("gpu", Coordinator, "prometheus.io/scheme: https", "prometheus.io/scheme: http", "but --http speaks https")]
    [InlineData("gpu-serving", Serving, "        prometheus.io/scrape: \"true\"\n", "", "no prometheus.io/scrape")]
    [InlineData("gpu", Policies, "              kubernetes.io/metadata.name: monitoring\n          podSelector:\n            matchLabels:\n              app.kubernetes.io/name: prometheus\n      ports:\n        - protocol: TCP\n          port: 50052",
        "              kubernetes.io/metadata.name: monitoring\n          podSelector:\n            matchLabels:\n              app.kubernetes.io/name: prometheus\n      ports:\n        - protocol: TCP\n          port: 50051", "lets more than labelled pods of this namespace")]
    [InlineData("gpu", Policies, "              kubernetes.io/metadata.name: monitoring\n", "              team: monitoring\n", "no NetworkPolicy lets a monitoring namespace")]
    [InlineData("gpu", Coordinator, "- --worker-token-file", "- --token-file", "one shared token for every role")]
    [InlineData("gpu", Coordinator, "              - key: tls.crt", "              - key: cert.pem", "not 'tls.crt' (a kubernetes.io/tls Secret")]
    [InlineData("gpu-serving", Serving, "            secretName: distdiffusion-client-token", "            secretName: distdiffusion-worker-token", "come from the one Secret distdiffusion-worker-token")]
    [InlineData("gpu", Coordinator, "      targetPort: grpc", "      targetPort: health", "exposes the cleartext health port")]
    [InlineData("gpu", Policies, "          port: 50051", "          port: 50054", "reach the coordinator's cleartext health port")]
    [InlineData("gpu", Coordinator, "- /app/coordinator", "- /app/coordinater", "none of the executables")]
    [InlineData("gpu", Coordinator, "- /checkpoints/run", "- /tmp/run", "not on a PersistentVolumeClaim")]
    [InlineData("gpu", Coordinator, "enableServiceLinks: false", "enableServiceLinks: true", "enableServiceLinks must be false")]
    [InlineData("gpu", Coordinator, "targetPort: grpc", "targetPort: http", "targetPort http is no container port")]
    [InlineData("gpu", Coordinator, "claimName: distdiffusion-checkpoints", "claimName: checkpoints", "which no manifest defines")]
    [InlineData("gpu", Coordinator, "              memory: 8Gi", "              memory: 2Gi", "memory request 4Gi exceeds its limit 2Gi")]
    [InlineData("gpu", Coordinator, "                    operator: NotIn", "                    operator: In", "does not keep it off the GPU pool")]
    [InlineData("gpu", Run, "DISTDIFFUSION_Coordinator__MinWorkers=", "DISTDIFFUSION_Coordinator__MinWorker=", "MinWorker is no setting of CoordinatorOptions")]
    [InlineData("gpu", Run, "DISTDIFFUSION_Coordinator__MinWorkers=2", "DISTDIFFUSION_Coordinator__MinWorkers=0", "rejects its configuration")]
    [InlineData("gpu", Run, "DISTDIFFUSION_Coordinator__Recipe=mnist-ddpm", "DISTDIFFUSION_Coordinator__Recipe=mnist-dddpm", "unknown recipe")]
    [InlineData("cpu", "components/cpu/kustomization.yaml", "DISTDIFFUSION_Coordinator__Recipe=mnist-small", "DISTDIFFUSION_Coordinator__Recipe=mnist-smal", "unknown recipe")]
    [InlineData("gpu", Run, "DISTDIFFUSION_Coordinator__Recipe=mnist-ddpm", "DISTDIFFUSION_Coordinator__Recipe=fashion-mnist-annotated", "no Job downloads it")]
    [InlineData("gpu-serving", "components/serving/serving.env", "DISTDIFFUSION_Coordinator__SampleWaitSeconds=120", "DISTDIFFUSION_Coordinator__SampleWaitSeconds=0", "rejects its configuration")]
    [InlineData("gpu", Base, "    options:\n      labels:", "    options:\n      disableNameSuffixHash: true\n      labels:", "whose name has no content hash")]
    [InlineData("gpu", Base, "  - workers.yaml\n", "  - workers.yaml\n  - ../jobs/samples-reader\n", "a one-off belongs in its own kustomization")]
    [InlineData("gpu", Workers, "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", "readOnlyRootFilesystem is not true")]
    [InlineData("gpu", GpuWorker, "              nvidia.com/gpu: \"1\"\n", "", "exactly one GPU")]
    [InlineData("gpu-serving", GpuWorker, "operator: Exists", "operator: Equal", "does not tolerate the GPU pool's taint")]
    [InlineData("gpu", GpuWorker, "distdiffusion/pool: gpu", "distdiffusion/pool: cpu", "nodeSelector does not pick the GPU pool")]
    [InlineData("gpu", Images, "    newTag: 0.1.0-cuda", "    newTag: latest", "is not <repository>:<version>-<variant>")]
    [InlineData("gpu", Images, "    newTag: 0.1.0-cuda", "    newTag: 0.2.0-cuda", "the manifests use images of different builds")]
    [InlineData("gpu", GpuWorker, "image: distdiffusion-cuda", "image: distdiffusion-gpu", "is not <repository>:<version>-<variant>")]
    [InlineData("gpu", GpuWorker, "image: distdiffusion-cuda", "image: distdiffusion-cpu", "runs the cuda image variant")]
    [InlineData("cpu", CpuWorker, "image: distdiffusion-cpu", "image: distdiffusion-cuda", "a CPU worker runs the cpu image variant")]
    [InlineData("cpu", CpuWorker, "            - cpu\n", "            - cuda\n", "--device cuda on a CPU worker")]
    [InlineData("cpu-serving", CpuWorker, "              memory: 3Gi\n", "              memory: 3Gi\n              nvidia.com/gpu: \"1\"\n", "a CPU worker requests nvidia.com/gpu")]
    [InlineData("gpu", GpuWorker, "- https://distdiffusion-coordinator:50051", "- https://coordinator:50051", "is no Service of these manifests")]
    [InlineData("gpu", GpuWorker, "- /var/run/secrets/distdiffusion/worker/token", "- /tmp/token", "is not on a mounted Secret")]
    [InlineData("cpu", CpuWorker, "- https://distdiffusion-coordinator:50051", "- http://distdiffusion-coordinator:50051", "cleartext; the coordinator's address is https://")]
    [InlineData("gpu", GpuWorker, "            - --tls-ca\n            - /var/run/secrets/distdiffusion/ca/ca.crt\n", "", "no --tls-ca")]
    [InlineData("gpu", Workers, "            secretName: distdiffusion-worker-token", "            secretName: distdiffusion-client-token", "not the worker token Secret distdiffusion-worker-token")]
    [InlineData("gpu", Workers, "              - key: ca.crt", "              - key: tls.key", "mounts the coordinator's private key")]
    [InlineData("gpu-serving", Sample, "            secretName: distdiffusion-client-token", "            secretName: distdiffusion-worker-token", "not the client token Secret distdiffusion-client-token")]
    [InlineData("gpu", Workers, "              drop:\n                - ALL", "              drop:\n                - NET_RAW", "does not drop ALL capabilities")]
    [InlineData("gpu", Workers, "runAsUser: 1654", "runAsUser: 1000", "differs from the image's USER 1654")]
    [InlineData("gpu", Workers, "            - name: tmp\n              mountPath: /tmp\n", "", "without a writable emptyDir at /tmp")]
    [InlineData("gpu", Download, "              memory: 256Mi\n", "", "no memory request")]
    [InlineData("gpu", Policies, "                  - worker\n                  - sampler\n      ports:", "                  - sampler\n      ports:", "do not let it reach port 50051")]
    [InlineData("gpu", Policies, "  podSelector: {}\n  policyTypes:\n    - Ingress\n    - Egress", "  podSelector: {}\n  policyTypes:\n    - Ingress", "no default-deny NetworkPolicy")]
    [InlineData("gpu", Policies, "          port: 53", "          port: 5353", "may not send DNS queries")]
    [InlineData("gpu", Download, "- /data/mnist", "- /data/mnist2", "but the recipe's data is read from /data/mnist")]
    [InlineData("gpu", Sample, "- /samples/grid.png", "- /tmp/grid.png", "not on a PersistentVolumeClaim")]
    [InlineData("gpu", Sample, "restartPolicy: Never", "restartPolicy: Always", "need restartPolicy Never or OnFailure")]
    [InlineData("cpu", "setup/namespace.yaml", "enforce: restricted", "enforce: baseline", "restricted Pod Security Standard")]
    public void A_broken_manifest_is_reported(string target, string file, string oldText, string newText, string expected)
    {
        var problems = AllProblems(ManifestSet.FromRepoWith(DeployTarget.Named(target), file, oldText, newText));
        Assert.True(problems.Any(p => p.Contains(expected, StringComparison.Ordinal)),
            $"no problem mentions '{expected}'; got:\n  " + string.Join("\n  ", problems));
    }

    [KustomizeTheory]
    [InlineData("kubectl -n distdiffusion create secret generic dd-token --from-file=token=./token", "not dd-token")]
    [InlineData("kubectl -n distdiffusion create secret tls distdiffusion-tls --cert=tls.crt --key=tls.key", "the pods read the key 'ca.crt' of Secret distdiffusion-tls")]
    [InlineData("kubectl -n distdiffusion scale deployment/distdiffusion-workers --replicas=4", "no Deployment distdiffusion-workers")]
    [InlineData("kubectl -n distdiffusion scale deployment/distdiffusion-serving --replicas=2", "is not a worker Deployment")]
    [InlineData("kubectl -n distdiffusion patch job/distdiffusion-worker --type=merge -p '{\"spec\":{\"parallelism\":4}}'", "completions and parallelism together")]
    [InlineData("kubectl -n distdiffusion patch job/distdiffusion-coordinator --type=merge -p '{\"spec\":{\"parallelism\":2,\"completions\":2}}'", "is not the training worker Job")]
    [InlineData("kubectl -n distdiffusion wait --for=condition=ready job/distdiffusion-coordinator", "--for=condition=complete")]
    [InlineData("kubectl -n distdiffusion logs -f job/distdiffusion-trainer", "no Job distdiffusion-trainer")]
    [InlineData("kubectl apply -k deploy/k8s/overlays/laptop", "deploy/k8s/overlays/laptop holds no kustomization.yaml")]
    [InlineData("kubectl apply -k deploy/k8s/components/gpu", "is a kustomize Component")]
    [InlineData("kubectl apply -f deploy/k8s/jobs/sample/job.yaml", "apply it with -k")]
    [InlineData("kubectl delete -k deploy/k8s", "the volume claims too")]
    [InlineData("coordinator status --address http://127.0.0.1:50051 --token ./token", "has no option --token")]
    [InlineData("worker --coordinator http://127.0.0.1:50051 --gpu 0", "has no option --gpu")]
    [InlineData("docker build -f deploy/docker/Dockerfile --build-arg TORCH_DEVICE=rocm -t distdiffusion:0.1.0-rocm .", "must be one of")]
    [InlineData("kubectl taint nodes n1 nvidia.com/gpu=true:NoSchedule", "the GPU pool taint is")]
    public void A_wrong_command_in_the_doc_is_reported(string command, string expected)
    {
        var doc = RepoFiles.Read(RepoFiles.KubernetesDoc) + "\n```sh\n" + command + "\n```\n";
        var problems = DocsChecks.Check(doc, ManifestSet.AllFromRepo(), DeployFacts.Current, Docker.Value);
        Assert.True(problems.Any(p => p.Contains(expected, StringComparison.Ordinal)), $"no problem mentions '{expected}'; got:\n  " + string.Join("\n  ", problems));
    }
}
