using System.Text.RegularExpressions;

namespace DistDiffusion.Tests.Structure;

/// <summary>
/// Which of the project's namespaces each namespace uses, read from the C# sources: every <c>using</c> directive and
/// every qualified name that names a declared namespace, fully or partly written (as C# resolves it from the enclosing
/// namespaces), and every <c>global using</c>, which applies to its whole project (comments do not count). A namespace also uses its parent
/// namespaces, whose types it sees without a <c>using</c>; so a parent that imports one of its children is a cycle too.
/// </summary>
internal sealed partial class NamespaceGraph
{
    private readonly Dictionary<string, Dictionary<string, SortedSet<string>>> _edges = new(StringComparer.Ordinal);

    private NamespaceGraph(IEnumerable<string> namespaces) => Namespaces = new SortedSet<string>(namespaces, StringComparer.Ordinal);

    public SortedSet<string> Namespaces { get; }

    /// <summary>The graph of the sources under <paramref name="folder"/> (bin/ and obj/ skipped), edges labelled with the files relative to it.</summary>
    public static NamespaceGraph FromFolder(string folder) =>
        FromSources(Directory.EnumerateFiles(folder, "*.cs", SearchOption.AllDirectories)
            .Where(f => !f.Split(Path.DirectorySeparatorChar).Any(part => part is "bin" or "obj"))
            .Select(f => (Path.GetRelativePath(folder, f).Replace(Path.DirectorySeparatorChar, '/'), File.ReadAllText(f))));

    /// <summary>The graph of the given (file name, source text) pairs.</summary>
    public static NamespaceGraph FromSources(IEnumerable<(string File, string Text)> sources)
    {
        var files = sources.Select(s => (s.File, Code: StripComments(s.Text))).ToList();
        var declared = files.Select(f => (f.File, f.Code, Namespace: NamespaceDeclaration().Match(f.Code) is { Success: true } m ? m.Groups[1].Value : null)).ToList();
        var graph = new NamespaceGraph(declared.Where(d => d.Namespace is not null).Select(d => d.Namespace!));
        foreach (var ns in graph.Namespaces)
            for (var parent = Parent(ns); parent is not null; parent = Parent(parent))
                if (graph.Namespaces.Contains(parent))
                    graph.Add(ns, parent, "(parent namespace)");
        foreach (var (file, code, ns) in declared)
        {
            if (ns is null) continue;   // top-level statements: nothing can import them
            foreach (Match m in QualifiedName().Matches(code))
            {
                var target = graph.Resolve(ns, m.Value);
                if (target is not null && target != ns) graph.Add(ns, target, file);
            }
        }
        // A global using applies to every file of its project (the sources under the same first folder), whatever
        // namespace they declare.
        foreach (var (file, code, _) in declared)
            foreach (Match m in GlobalUsing().Matches(code))
            {
                var target = graph.Owner(m.Groups[1].Value);
                if (target is null) continue;
                foreach (var other in declared.Where(d => d.Namespace is not null && d.Namespace != target && Project(d.File) == Project(file)))
                    graph.Add(other.Namespace!, target, file + " (global using)");
            }
        return graph;
    }

    /// <summary>
    /// The namespace a name written in <paramref name="ns"/> refers to, as C# looks it up: from the innermost enclosing
    /// namespace outwards, the first one with a child namespace of the name's first part (so `Observe.Dashboard` written in
    /// `P.Coordinator.Server` is `P.Coordinator.Observe.Dashboard`), else the name as written.
    /// </summary>
    private string? Resolve(string ns, string name)
    {
        var first = name.Split('.')[0];
        for (string? scope = ns; scope is not null; scope = Parent(scope))
        {
            var candidate = scope + "." + first;
            if (Namespaces.Any(n => n == candidate || n.StartsWith(candidate + ".", StringComparison.Ordinal)))
                return Owner(scope + "." + name);
        }
        return Owner(name);
    }

    private static string Project(string file) => file.Split('/')[0];

    /// <summary>The namespaces <paramref name="ns"/> uses.</summary>
    public IReadOnlyCollection<string> ImportsOf(string ns) =>
        _edges.TryGetValue(ns, out var to) ? to.Keys : Array.Empty<string>();

    /// <summary>The files that make <paramref name="from"/> use <paramref name="to"/>.</summary>
    public IReadOnlyCollection<string> Why(string from, string to) =>
        _edges.TryGetValue(from, out var t) && t.TryGetValue(to, out var files) ? files : (IReadOnlyCollection<string>)Array.Empty<string>();

    /// <summary>One cycle (first namespace repeated at the end), or null when the graph has none.</summary>
    public IReadOnlyList<string>? FindCycle()
    {
        var state = new Dictionary<string, int>(StringComparer.Ordinal);   // 1 = on the current path, 2 = done
        var path = new List<string>();
        foreach (var start in Namespaces)
        {
            var cycle = Visit(start);
            if (cycle is not null) return cycle;
        }
        return null;

        List<string>? Visit(string ns)
        {
            if (state.TryGetValue(ns, out var s))
                return s == 1 ? [.. path.Skip(path.IndexOf(ns)), ns] : null;
            state[ns] = 1;
            path.Add(ns);
            foreach (var next in ImportsOf(ns).Order(StringComparer.Ordinal))
            {
                var cycle = Visit(next);
                if (cycle is not null) return cycle;
            }
            path.RemoveAt(path.Count - 1);
            state[ns] = 2;
            return null;
        }
    }

    /// <summary>A cycle as one line per edge with the files behind it.</summary>
    public string Describe(IReadOnlyList<string> cycle) =>
        string.Join(Environment.NewLine, cycle.Zip(cycle.Skip(1), (a, b) => $"{a} -> {b} ({string.Join(", ", Why(a, b))})"));

    private void Add(string from, string to, string file)
    {
        if (!_edges.TryGetValue(from, out var targets)) _edges[from] = targets = new(StringComparer.Ordinal);
        if (!targets.TryGetValue(to, out var files)) targets[to] = files = new(StringComparer.Ordinal);
        files.Add(file);
    }

    /// <summary>The longest declared namespace that <paramref name="qualifiedName"/> is or starts with.</summary>
    private string? Owner(string qualifiedName) =>
        Namespaces.Where(n => qualifiedName == n || qualifiedName.StartsWith(n + ".", StringComparison.Ordinal)).MaxBy(n => n.Length);

    private static string? Parent(string ns) => ns.LastIndexOf('.') is var i and > 0 ? ns[..i] : null;

    private static string StripComments(string text) => Comments().Replace(text, " ");

    [GeneratedRegex(@"^\s*namespace\s+([\w.]+)", RegexOptions.Multiline)]
    private static partial Regex NamespaceDeclaration();

    [GeneratedRegex(@"\b[A-Za-z_]\w*(?:\.\w+)+")]
    private static partial Regex QualifiedName();

    [GeneratedRegex(@"^\s*global\s+using\s+(?:static\s+)?([\w.]+)\s*;", RegexOptions.Multiline)]
    private static partial Regex GlobalUsing();

    [GeneratedRegex(@"//[^\n]*|/\*.*?\*/", RegexOptions.Singleline)]
    private static partial Regex Comments();
}
