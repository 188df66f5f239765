namespace DistDiffusion.Tests.Structure;

/// <summary>
/// The layering of the sources: no two namespaces import each other (directly or round a loop), and the components a
/// recipe configures take option records of their own, so they import neither the recipe nor the trainer.
/// </summary>
public sealed class NamespaceGraphTests
{
    private static readonly Lazy<NamespaceGraph> Sources = new(() => NamespaceGraph.FromFolder(Repository.PathOf("src")));

    /// <summary>The diffusion math, the networks, the data, the optimizer and images: the bottom of the graph.</summary>
    private static readonly string[] Components =
    [
        "DistDiffusion.Model.Data", "DistDiffusion.Model.Diffusion", "DistDiffusion.Model.Networks",
        "DistDiffusion.Model.Optimization", "DistDiffusion.Model.Imaging",
    ];

    [Fact]
    public void TheSourcesDeclareTheNamespacesThisTestReasonsAbout()
    {
        var declared = Sources.Value.Namespaces;
        foreach (var ns in Components.Append("DistDiffusion.Model.Configuration").Append("DistDiffusion.Model.Checkpoints").Append("DistDiffusion.Model.Training"))
            Assert.Contains(ns, declared);
    }

    [Fact]
    public void NoNamespaceImportsItselfRoundALoop()
    {
        var graph = Sources.Value;
        var cycle = graph.FindCycle();
        Assert.True(cycle is null, cycle is null ? "" : "namespaces that import each other:" + Environment.NewLine + graph.Describe(cycle));
    }

    [Fact]
    public void ComponentsImportNoOtherPartOfTheProject()
    {
        var graph = Sources.Value;
        foreach (var component in Components)
        {
            var upward = graph.ImportsOf(component).Where(ns => ns != "DistDiffusion.Model").ToList();
            Assert.True(upward.Count == 0,
                $"{component} imports {string.Join(", ", upward.Select(ns => $"{ns} ({string.Join(", ", graph.Why(component, ns))})"))}; components take option records of their own");
        }
    }

    [Fact]
    public void TheRecipeSitsOnTheComponentsAndBelowCheckpointsAndTraining()
    {
        var graph = Sources.Value;
        const string configuration = "DistDiffusion.Model.Configuration";
        var allowed = Components.Append("DistDiffusion.Model").ToHashSet(StringComparer.Ordinal);
        var other = graph.ImportsOf(configuration).Where(ns => !allowed.Contains(ns)).ToList();
        Assert.True(other.Count == 0, $"{configuration} imports {string.Join(", ", other)}: the recipe may only build the components' option records");
        Assert.DoesNotContain("DistDiffusion.Model.Training", graph.ImportsOf("DistDiffusion.Model.Checkpoints"));
    }

    [Fact]
    public void ALoopThroughUsingsQualifiedNamesOrAParentIsFound()
    {
        // The finder itself: each kind of edge can close a cycle, and comments are not edges.
        var viaUsing = NamespaceGraph.FromSources(
        [
            ("A.cs", "using P.B;\nnamespace P.A;\nclass A { }"),
            ("B.cs", "namespace P.B;\nclass B { P.A.A? a; }"),
        ]);
        Assert.Equal(["P.A", "P.B", "P.A"], viaUsing.FindCycle());
        Assert.Equal(["B.cs"], viaUsing.Why("P.B", "P.A"));

        var viaParent = NamespaceGraph.FromSources(
        [
            ("Root.cs", "using P.Child;\nnamespace P;\nclass R { }"),
            ("Child.cs", "namespace P.Child;\nclass C { }"),
        ]);
        Assert.Equal(["P", "P.Child", "P"], viaParent.FindCycle());

        // A partly written name resolves from the enclosing namespaces, as C# does.
        var viaPartialName = NamespaceGraph.FromSources(
        [
            ("Server.cs", "namespace P.App.Server;\nclass S { object x = Observe.Dashboard.Path; }"),
            ("Observe.cs", "using P.App.Server;\nnamespace P.App.Observe;\nclass Dashboard { S? s; }"),
        ]);
        Assert.Equal(["P.App.Observe", "P.App.Server", "P.App.Observe"], viaPartialName.FindCycle());
        Assert.Equal(["Server.cs"], viaPartialName.Why("P.App.Server", "P.App.Observe"));

        // A global using makes every namespace of its project import the target.
        var viaGlobalUsing = NamespaceGraph.FromSources(
        [
            ("Lib/Usings.cs", "global using P.Lib.Low;"),
            ("Lib/Low.cs", "namespace P.Lib.Low;\nclass L { P.Lib.High.H? h; }"),
            ("Lib/High.cs", "namespace P.Lib.High;\nclass H { }"),
            ("Other/O.cs", "namespace P.Other;\nclass O { }"),
        ]);
        Assert.Equal(["P.Lib.High", "P.Lib.Low", "P.Lib.High"], viaGlobalUsing.FindCycle());
        Assert.DoesNotContain("P.Lib.Low", viaGlobalUsing.ImportsOf("P.Other"));

        var commentOnly = NamespaceGraph.FromSources(
        [
            ("A.cs", "using P.B;\nnamespace P.A;\nclass A { }"),
            ("B.cs", "namespace P.B;\n// uses P.A.A in a comment\n/* and P.A here */\nclass B { }"),
        ]);
        Assert.Null(commentOnly.FindCycle());
        Assert.Equal(["P.B"], commentOnly.ImportsOf("P.A"));
    }
}
