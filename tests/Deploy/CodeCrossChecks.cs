using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Model.Configuration;
using k8s.Models;

namespace DistDiffusion.Tests.Deploy;

/// <summary>
/// The manifests against the code: the flags each container passes exist on the command it runs, the URLs they dial
/// reach the coordinator's Service and port, token files are the mounted Secret, every environment variable is one the
/// programs read (DISTDIFFUSION_TOKEN or DISTDIFFUSION_Coordinator__&lt;a CoordinatorOptions property&gt;) and the
/// ConfigMap's values pass the coordinator's own configuration binding and validation, and the recipe's dataset
/// folder is where the dataset volume is mounted and where the download Job writes.
/// </summary>
internal static class CodeCrossChecks
{
    public static List<string> Check(ManifestSet set, DeployFacts facts, DockerfileFacts docker)
    {
        var apps = AppContainers.Of(set, facts, docker);
        var p = new List<string>(apps.Problems);
        foreach (var c in set.Containers()) CheckEnvironmentNames(c, set, facts, apps, p);
        foreach (var a in apps.All)
        {
            CheckTokenFiles(a, p);
            if (a.CoordinatorUrl is { } url) CheckCoordinatorUrl(a, url, set, facts, apps, p);
        }
        var server = apps.Running(facts.CoordinatorExe, "serve").FirstOrDefault();
        if (server is null) p.Add($"no container runs `{facts.CoordinatorExe} serve`");
        else CheckServe(server, set, facts, docker, apps, p);
        foreach (var s in apps.Running(facts.CoordinatorExe, "sample"))
            if (s.Invocation.Value("--out") is { } output) CheckPersistentOutput(s, output, p);
        return p;
    }

    /// <summary>Environment variable names a container sets (env and the keys of envFrom ConfigMaps), with their values where known.</summary>
    public static List<(string Name, string? Value)> Environment(ContainerInPod c, ManifestSet set)
    {
        var vars = new List<(string, string?)>();
        foreach (var ef in c.Container.EnvFrom ?? [])
        {
            if (ef.ConfigMapRef is { } r)
                foreach (var (k, v) in set.All<V1ConfigMap>().FirstOrDefault(cm => cm.Metadata?.Name == r.Name)?.Data ?? new Dictionary<string, string>())
                    vars.Add(((ef.Prefix ?? "") + k, v));
            if (ef.SecretRef is not null) vars.Add(("(every key of Secret " + ef.SecretRef.Name + ")", null));
        }
        foreach (var e in c.Container.Env ?? [])
        {
            string? fromMap = null;
            if (e.ValueFrom?.ConfigMapKeyRef is { } k && set.All<V1ConfigMap>().FirstOrDefault(cm => cm.Metadata?.Name == k.Name)?.Data is { } data)
                data.TryGetValue(k.Key, out fromMap);
            vars.Add((e.Name, e.Value ?? fromMap));
        }
        return vars;
    }

    private static void CheckEnvironmentNames(ContainerInPod c, ManifestSet set, DeployFacts facts, AppContainers apps, List<string> p)
    {
        var app = apps.All.FirstOrDefault(a => a.Container == c);
        var isServer = app is not null && app.Exe == facts.CoordinatorExe && app.Invocation.Command.Name == "serve";
        var sectionPrefix = facts.EnvironmentPrefix + facts.CoordinatorSection + "__";
        foreach (var (name, _) in Environment(c, set))
        {
            if (facts.TokenVariables.Contains(name)) continue;
            if (name.StartsWith(sectionPrefix, StringComparison.OrdinalIgnoreCase))
            {
                var key = name[sectionPrefix.Length..];
                var parts = key.Split("__");
                var known = (parts.Length == 1 && facts.CoordinatorKeys.Contains(parts[0], StringComparer.OrdinalIgnoreCase))
                    || (parts.Length == 2 && facts.CoordinatorArrayKeys.Contains(parts[0], StringComparer.OrdinalIgnoreCase) && int.TryParse(parts[1], out var i) && i >= 0);
                if (!known)
                    p.Add($"{c}: {name}: {key} is no setting of CoordinatorOptions (it has: {string.Join(", ", facts.CoordinatorKeys.Concat(facts.CoordinatorArrayKeys.Select(k => k + "__N")))})");
                else if (!isServer)
                    p.Add($"{c}: {name} is read by `{facts.CoordinatorExe} serve` only, not by this container");
                continue;
            }
            p.Add($"{c}: environment variable {name} is read by none of the programs ({string.Join(", ", facts.TokenVariables)}, {sectionPrefix}<CoordinatorOptions property>)");
        }
    }

    /// <summary>Flags naming a token file.</summary>
    public static readonly string[] TokenFlags = ["--token-file", "--worker-token-file", "--client-token-file"];

    private static void CheckTokenFiles(AppContainer a, List<string> p)
    {
        foreach (var flag in TokenFlags)
            foreach (var path in a.Invocation.Values(flag))
            {
                var file = SecretFile(a, path);
                if (file is null) p.Add($"{a}: {flag} {path} is not on a mounted Secret");
                else if (file.Value.Key != "token") p.Add($"{a}: {flag} {path} is not the key 'token' of Secret {file.Value.Secret}");
            }
        // Everything that serves or dials the coordinator needs a token: none of the manifests sets the environment variables.
        var serves = a.Invocation.Command.Name == "serve";
        if (serves && !a.Invocation.Has("--token-file") && !(a.Invocation.Has("--worker-token-file") && a.Invocation.Has("--client-token-file")))
            p.Add($"{a}: neither --worker-token-file and --client-token-file nor --token-file: it would look for the token variables, which no manifest sets");
        if (!serves && a.CoordinatorUrl is not null && !a.Invocation.Has("--token-file"))
            p.Add($"{a}: no --token-file: it would look for the token variables, which no manifest sets");
    }

    /// <summary>The Secret and key a path in the container is projected from, or null when it is on no Secret volume.</summary>
    public static (string Secret, string Key)? SecretFile(AppContainer a, string path)
    {
        var mount = AppContainers.MountFor(a.Container, path);
        var secret = mount is null ? null : AppContainers.VolumeOf(a.Container, mount)?.Secret;
        if (mount is null || secret is null || path.Length <= mount.MountPath.TrimEnd('/').Length) return null;
        var relative = path[(mount.MountPath.TrimEnd('/').Length + 1)..];
        if (secret.Items is null) return (secret.SecretName, relative);
        var item = secret.Items.FirstOrDefault(i => i.Path == relative);
        return item is null ? null : (secret.SecretName, item.Key);
    }

    private static void CheckCoordinatorUrl(AppContainer a, string url, ManifestSet set, DeployFacts facts, AppContainers apps, List<string> p)
    {
        if (!Uri.TryCreate(url, UriKind.Absolute, out var uri))
        {
            p.Add($"{a}: {url} is not a URL");
            return;
        }
        var server = apps.Running(facts.CoordinatorExe, "serve").FirstOrDefault();
        if (uri.Scheme != (server?.Invocation.Has("--tls-cert") == true ? "https" : "http")) p.Add($"{a}: {url}: the coordinator serves {(server?.Invocation.Has("--tls-cert") == true ? "https" : "http")}");
        var host = uri.Host.Split('.');
        var service = set.All<V1Service>().FirstOrDefault(s => s.Metadata?.Name == host[0]);
        if (service is null || (host.Length > 1 && host[1] != service.Metadata.NamespaceProperty))
        {
            p.Add($"{a}: {url}: {uri.Host} is no Service of these manifests");
            return;
        }
        var port = service.Spec.Ports?.FirstOrDefault(sp => sp.Port == uri.Port);
        if (port is null)
        {
            p.Add($"{a}: {url}: Service {service.Metadata.Name} has no port {uri.Port}");
            return;
        }
        var target = server?.Container;
        if (target is null || !service.Spec.Selector.All(kv => target.Pod.Labels.TryGetValue(kv.Key, out var v) && v == kv.Value))
        {
            p.Add($"{a}: {url}: Service {service.Metadata.Name} does not select the coordinator's pod");
            return;
        }
        var containerPort = (target.Container.Ports ?? []).FirstOrDefault(cp => cp.Name == port.TargetPort?.Value || cp.ContainerPort.ToString(System.Globalization.CultureInfo.InvariantCulture) == port.TargetPort?.Value);
        if (containerPort?.ContainerPort != facts.DefaultPort) p.Add($"{a}: {url}: the Service port does not lead to the coordinator's port {facts.DefaultPort}");
    }

    private static void CheckServe(AppContainer s, ManifestSet set, DeployFacts facts, DockerfileFacts docker, AppContainers apps, List<string> p)
    {
        var inv = s.Invocation;
        var listen = inv.Value("--listen");
        if (listen is null || !Uri.TryCreate(listen, UriKind.Absolute, out var uri)) p.Add($"{s}: no --listen URL (the default {DistDiffusion.Protocol.Names.DefaultAddress} is loopback only, unreachable from other pods)");
        else
        {
            if (uri.Host is not ("0.0.0.0" or "[::]")) p.Add($"{s}: --listen {listen} does not listen on all interfaces");
            if (uri.Port != facts.DefaultPort) p.Add($"{s}: --listen port {uri.Port} is not {facts.DefaultPort}");
            if (!(s.Container.Container.Ports ?? []).Any(cp => cp.ContainerPort == uri.Port)) p.Add($"{s}: listens on {uri.Port}, which is no containerPort");
        }
        var sampleOnly = inv.Has("--sample-only");
        var resume = inv.Value("--resume");
        if (sampleOnly)
        {
            if (resume is not null) p.Add($"{s}: --resume with --sample-only: the serving coordinator trains nothing");
            if (inv.Value("--checkpoint") is null) p.Add($"{s}: --sample-only without --checkpoint DIR: nothing to serve");
        }
        else if (resume is null) p.Add($"{s}: no --resume DIR: a rescheduled coordinator would not continue its run");
        else CheckPersistentOutput(s, resume, p);

        // The configuration the coordinator would bind: its environment through its own Configure (unknown keys and bad values throw).
        var env = Environment(s.Container, set).Where(e => e.Name.StartsWith(facts.EnvironmentPrefix, StringComparison.OrdinalIgnoreCase) && !facts.TokenVariables.Contains(e.Name))
            .ToDictionary(e => e.Name[facts.EnvironmentPrefix.Length..].Replace("__", ":", StringComparison.Ordinal), e => e.Value);
        Coordinator.Configuration.CoordinatorOptions options;
        try
        {
            options = ServeCommand.Configure(env);
        }
        catch (UsageException e)
        {
            p.Add($"{s}: the coordinator rejects its configuration: {e.Message}");
            return;
        }
        if (sampleOnly) return;   // the recipe and the weights come from the checkpoint; no dataset is read
        if (options.KeepServing && set.Mode == DeployMode.Training)
            p.Add($"{s}: its settings say KeepServing: it keeps serving after training, so neither its Job nor the workers' would complete");
        var minWorkers = inv.Value("--min-workers") is { } flag ? int.Parse(flag, System.Globalization.CultureInfo.InvariantCulture) : options.MinWorkers;
        foreach (var w in apps.Running(facts.WorkerExe))
            if (w.Container.Pod.Owner.Object is V1Job { Spec.Completions: { } completions } && completions < minWorkers)
                p.Add($"{s}: waits for {minWorkers} workers before the first step (MinWorkers), but the worker Job {w.Container.Pod.Owner.Name} runs only {completions}: the run would never start");
        var recipeName = inv.Value("--recipe") ?? options.Recipe;
        if (recipeName is null)
        {
            p.Add($"{s}: no recipe (--recipe or {facts.EnvironmentPrefix}{facts.CoordinatorSection}__Recipe): --resume on an empty folder could not start the run");
            return;
        }
        Recipe recipe;
        try
        {
            recipe = Recipes.Get(recipeName).WithOverrides(inv.Values("--set").Count > 0 ? inv.Values("--set") : options.Set);
        }
        catch (ArgumentException e)
        {
            p.Add($"{s}: recipe {recipeName}: {e.Message}");
            return;
        }
        if (!recipe.IsImageData) return;
        CheckDataset(recipe, s, facts, docker, apps, p);
    }

    /// <summary>
    /// Where a container finds the recipe's relative data path, as Recipe.WithResolvedDataPath searches: the working
    /// directory, then each folder from the executable's folder up to the root. The coordinator and every worker must
    /// find it on the same read-many dataset claim, and the download Job must write that very folder.
    /// </summary>
    private static void CheckDataset(Recipe recipe, AppContainer server, DeployFacts facts, DockerfileFacts docker, AppContainers apps, List<string> p)
    {
        var dataPath = recipe.DataPath!;
        var readers = new[] { server }.Concat(apps.Running(facts.WorkerExe)).ToList();
        var resolved = new List<(AppContainer Reader, string Path, string? Claim)>();
        foreach (var r in readers)
        {
            if (dataPath.StartsWith('/'))
            {
                resolved.Add((r, dataPath, ClaimAt(r, dataPath)));
                continue;
            }
            var candidates = new List<string> { Combine(r.Container.Container.WorkingDir ?? docker.WorkDir, dataPath) };
            for (var dir = docker.AppDir; ; dir = Parent(dir))
            {
                candidates.Add(Combine(dir, dataPath));
                if (dir == "/") break;
            }
            var found = candidates.FirstOrDefault(c => ClaimAt(r, c) is not null);
            if (found is null) p.Add($"{r}: recipe {recipe.Name} reads {dataPath}, found at none of {string.Join(", ", candidates.Distinct())}: no volume is mounted there");
            else resolved.Add((r, found, ClaimAt(r, found)));
        }
        if (resolved.Select(x => (x.Path, x.Claim)).Distinct().Count() > 1)
            p.Add($"recipe {recipe.Name}: the coordinator and the workers find {dataPath} in different places: {string.Join(", ", resolved.Select(x => $"{x.Reader.Exe} {x.Path} ({x.Claim})"))}");
        if (resolved.Count == 0) return;
        var (_, folder, claim) = resolved[0];
        var downloads = apps.Running(facts.CoordinatorExe, "download").ToList();
        var matching = downloads.Where(d => string.Equals(d.Invocation.Value("--dataset")?.Replace("-", "", StringComparison.Ordinal), recipe.Dataset.ToString(), StringComparison.OrdinalIgnoreCase)).ToList();
        if (recipe.Dataset is Model.Data.DatasetKind.Mnist or Model.Data.DatasetKind.FashionMnist && matching.Count == 0)
            p.Add($"recipe {recipe.Name} needs {recipe.Dataset} data, and no Job downloads it");
        foreach (var d in matching)
        {
            var output = d.Invocation.Value("--out");
            if (output != folder || ClaimAt(d, output) != claim) p.Add($"{d}: writes {output}, but the recipe's data is read from {folder} on claim {claim}");
            else CheckPersistentOutput(d, output, p);
        }
    }

    private static string? ClaimAt(AppContainer a, string path) =>
        AppContainers.MountFor(a.Container, path) is { } m ? AppContainers.VolumeOf(a.Container, m)?.PersistentVolumeClaim?.ClaimName : null;

    /// <summary>A path the container writes and that must outlive the pod: on a writable PersistentVolumeClaim.</summary>
    private static void CheckPersistentOutput(AppContainer a, string path, List<string> p)
    {
        var mount = AppContainers.MountFor(a.Container, path);
        var volume = mount is null ? null : AppContainers.VolumeOf(a.Container, mount);
        if (mount is null || volume?.PersistentVolumeClaim is null) p.Add($"{a}: {path} is not on a PersistentVolumeClaim: it would be lost with the pod (or hit the read-only root)");
        else if (mount.ReadOnlyProperty == true || volume.PersistentVolumeClaim.ReadOnlyProperty == true) p.Add($"{a}: {path} is on a read-only mount");
    }

    private static string Combine(string dir, string relative) => dir.TrimEnd('/') + "/" + relative;

    private static string Parent(string dir)
    {
        var trimmed = dir.TrimEnd('/');
        var i = trimmed.LastIndexOf('/');
        return i <= 0 ? "/" : trimmed[..i];
    }
}
