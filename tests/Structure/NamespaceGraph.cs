using System.Text.RegularExpressions;

namespace DistDiffusion.Tests.Structure;

/// <summary>
/// Which of the project's namespaces each namespace uses, read from the C# sources: every <c>using</c> directive and
/// every qualified name that starts with a declared namespace (comments do not count). A namespace also uses its parent
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
                var target = graph.Owner(m.Value);
                if (target is not null && target != ns) graph.Add(ns, target, file);
            }
        }
        return graph;
    }

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

    [GeneratedRegex(@"//[^\n]*|/\*.*?\*/", RegexOptions.Singleline)]
    private static partial Regex Comments();
}
