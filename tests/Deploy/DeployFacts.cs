using System.Reflection;
using System.Text.RegularExpressions;
using System.Xml.Linq;
using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Protocol;
using DistDiffusion.Worker;

namespace DistDiffusion.Tests.Deploy;

/// <summary>
/// What the deployment files must agree with, read from the code and the project files rather than restated:
/// executable names, the default port, environment variable names and configuration keys, the TorchDevice
/// build switch and the projects a publish of the coordinator needs.
/// </summary>
internal sealed partial record DeployFacts(
    string CoordinatorExe,
    string WorkerExe,
    int DefaultPort,
    int DefaultHealthPort,
    int DefaultHttpPort,
    string TokenVariable,
    IReadOnlyList<string> TokenVariables,
    string EnvironmentPrefix,
    string CoordinatorSection,
    IReadOnlyList<string> CoordinatorKeys,
    IReadOnlyList<string> CoordinatorArrayKeys,
    IReadOnlyList<string> TorchDevices,
    string DefaultTorchDevice,
    string CoordinatorProject,
    IReadOnlyList<string> CoordinatorProjectClosure)
{
    /// <summary>The GPU node pool contract the worker manifests and docs/kubernetes.md share.</summary>
    public const string GpuPoolLabel = "distdiffusion/pool";
    public const string GpuPoolValue = "gpu";
    public const string GpuTaintKey = "nvidia.com/gpu";
    public const string GpuTaintValue = "present";
    public const string GpuTaintEffect = "NoSchedule";
    public const string GpuResource = "nvidia.com/gpu";
    /// <summary>The exit code of a bad flag or setting, for `coordinator` (CliSupport.ExitUsage) and `worker` alike (WorkerCli: "2 usage").</summary>
    public const int UsageExitCode = CliSupport.ExitUsage;

    private static readonly Lazy<DeployFacts> Instance = new(Read);

    public static DeployFacts Current => Instance.Value;

    public IReadOnlyList<string> Executables => [CoordinatorExe, WorkerExe];

    private static DeployFacts Read()
    {
        var settable = typeof(CoordinatorOptions).GetProperties(BindingFlags.Public | BindingFlags.Instance)
            .Where(p => p.CanWrite && p.SetMethod!.IsPublic).ToList();
        var coordinatorProject = "src/Coordinator/DistDiffusion.Coordinator.csproj";
        return new DeployFacts(
            CoordinatorExe: typeof(CoordinatorCli).Assembly.GetName().Name!,
            WorkerExe: typeof(WorkerCli).Assembly.GetName().Name!,
            DefaultPort: Names.DefaultPort,
            DefaultHealthPort: Names.DefaultHealthPort,
            DefaultHttpPort: Names.DefaultHttpPort,
            TokenVariable: Names.TokenEnvironmentVariable,
            TokenVariables: [Names.TokenEnvironmentVariable, Names.WorkerTokenEnvironmentVariable, Names.ClientTokenEnvironmentVariable],
            EnvironmentPrefix: Names.EnvironmentPrefix,
            CoordinatorSection: CoordinatorOptions.Section,
            CoordinatorKeys: settable.Where(p => !p.PropertyType.IsArray).Select(p => p.Name).ToList(),
            CoordinatorArrayKeys: settable.Where(p => p.PropertyType.IsArray).Select(p => p.Name).ToList(),
            TorchDevices: TorchDeviceValues(),
            DefaultTorchDevice: DefaultTorchDeviceValue(),
            CoordinatorProject: coordinatorProject,
            CoordinatorProjectClosure: ProjectClosure(coordinatorProject));
    }

    [GeneratedRegex(@"'\$\(TorchDevice\)'\s*==\s*'([a-z0-9]+)'")]
    private static partial Regex TorchDeviceCondition();

    /// <summary>The values src/Model's project file switches libtorch packages on.</summary>
    private static List<string> TorchDeviceValues()
    {
        var doc = XDocument.Load(RepoFiles.PathOf("src/Model/DistDiffusion.Model.csproj"));
        return doc.Descendants().Select(e => (string?)e.Attribute("Condition")).OfType<string>()
            .Select(c => TorchDeviceCondition().Match(c)).Where(m => m.Success).Select(m => m.Groups[1].Value).Distinct().ToList();
    }

    /// <summary>The default Directory.Build.props gives TorchDevice when no -p:TorchDevice is passed.</summary>
    private static string DefaultTorchDeviceValue()
    {
        var doc = XDocument.Load(RepoFiles.PathOf("Directory.Build.props"));
        var e = doc.Descendants("TorchDevice").FirstOrDefault(x => ((string?)x.Attribute("Condition"))?.Contains("== ''", StringComparison.Ordinal) == true)
            ?? throw new InvalidOperationException("Directory.Build.props sets no default TorchDevice");
        return e.Value.Trim();
    }

    /// <summary>A project and every project it references, transitively (paths relative to the repository, '/'-separated).</summary>
    private static List<string> ProjectClosure(string project)
    {
        var seen = new List<string>();
        var queue = new Queue<string>([project]);
        while (queue.Count > 0)
        {
            var p = queue.Dequeue();
            if (seen.Contains(p)) continue;
            seen.Add(p);
            var dir = Path.GetDirectoryName(RepoFiles.PathOf(p))!;
            foreach (var r in XDocument.Load(RepoFiles.PathOf(p)).Descendants("ProjectReference"))
            {
                var full = Path.GetFullPath(Path.Combine(dir, ((string)r.Attribute("Include")!).Replace('\\', Path.DirectorySeparatorChar)));
                queue.Enqueue(Path.GetRelativePath(RepoFiles.Root, full).Replace(Path.DirectorySeparatorChar, '/'));
            }
        }
        return seen;
    }

    /// <summary>The command line of an executable, as its Program.cs builds it.</summary>
    public System.CommandLine.RootCommand Cli(string exe) =>
        exe == CoordinatorExe ? CoordinatorCli.Build()
        : exe == WorkerExe ? WorkerCli.Build()
        : exe == "bench" ? DistDiffusion.Bench.BenchCli.Build()
        : throw new ArgumentException($"no executable named {exe}");
}
