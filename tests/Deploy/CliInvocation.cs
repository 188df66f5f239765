using System.CommandLine;

namespace DistDiffusion.Tests.Deploy;

/// <summary>
/// A container's command line parsed by the real command line of the executable it runs
/// (<c>CoordinatorCli.Build()</c> or <c>WorkerCli.Build()</c>), so a flag renamed or removed in the code
/// no longer parses.
/// </summary>
internal sealed class CliInvocation
{
    private CliInvocation(string exe, IReadOnlyList<string> args, ParseResult result)
    {
        Exe = exe;
        Args = args;
        Result = result;
    }

    public string Exe { get; }
    public IReadOnlyList<string> Args { get; }
    public ParseResult Result { get; }
    public Command Command => Result.CommandResult.Command;
    /// <summary>"coordinator serve", "worker", ...</summary>
    public string Verb => Command is RootCommand ? Exe : $"{Exe} {Command.Name}";

    /// <summary>Parses; adds a problem for every parse error and every --flag the resolved command does not have.</summary>
    public static CliInvocation Parse(DeployFacts facts, string exe, IReadOnlyList<string> args, string where, List<string> problems)
    {
        var root = facts.Cli(exe);
        var result = root.Parse(args.ToArray());
        var inv = new CliInvocation(exe, args, result);
        foreach (var e in result.Errors) problems.Add($"{where}: `{exe} {string.Join(' ', args)}`: {e.Message}");
        var known = inv.AvailableOptions().SelectMany(o => o.Aliases.Append(o.Name)).ToHashSet(StringComparer.Ordinal);
        foreach (var a in args.Where(a => a.StartsWith("--", StringComparison.Ordinal)))
        {
            var name = a.Split('=', 2)[0];
            if (!known.Contains(name)) problems.Add($"{where}: {inv.Verb} has no option {name} (it has: {string.Join(", ", known.Order(StringComparer.Ordinal))})");
        }
        return inv;
    }

    /// <summary>The resolved command's options and the recursive options of its parents (--help, --version).</summary>
    public IEnumerable<Option> AvailableOptions()
    {
        var options = Command.Options.ToList();
        for (var parents = Command.Parents.OfType<Command>().ToList(); parents.Count > 0; parents = parents.SelectMany(p => p.Parents.OfType<Command>()).ToList())
            options.AddRange(parents.SelectMany(p => p.Options).Where(o => o.Recursive));
        return options;
    }

    private Option? Find(string name) => AvailableOptions().FirstOrDefault(o => o.Name == name || o.Aliases.Contains(name));

    /// <summary>Whether the option was given on the command line (not just defaulted).</summary>
    public bool Has(string name) => Find(name) is { } o && Result.GetResult(o) is { Implicit: false };

    /// <summary>The values given for an option (empty when absent or a flag).</summary>
    public IReadOnlyList<string> Values(string name) =>
        Find(name) is { } o && Result.GetResult(o) is { Implicit: false } r ? r.Tokens.Select(t => t.Value).ToList() : [];

    public string? Value(string name) => Values(name) is { Count: > 0 } v ? v[^1] : null;
}
