using System.CommandLine;
using System.Globalization;
using System.Text;
using System.Text.RegularExpressions;

namespace DistDiffusion.Tests.Deploy;

/// <summary>
/// README.md, CHANGELOG.md and docs/*.md against the code and each other: every `coordinator ...` and `worker ...`
/// command in a shell code block parses with the executables' real command lines, every `--flag` of a synopsis block
/// (```text) is one its verb has, every relative link names a file that exists (and a heading that exists, for
/// #anchor), and the README stays a short user's document.
/// </summary>
public sealed partial class DocumentationTests
{
    /// <summary>The README is the front page, not the reference: the depth lives in docs/.</summary>
    private const int ReadmeMaxLines = 260;

    private const string BenchExe = "bench";

    /// <summary>README.md, CHANGELOG.md and every docs/*.md, as paths relative to the repository.</summary>
    private static List<string> Documents()
    {
        var docs = Directory.EnumerateFiles(RepoFiles.PathOf("docs"), "*.md")
            .Select(f => "docs/" + Path.GetFileName(f)).Order(StringComparer.Ordinal).ToList();
        return ["README.md", "CHANGELOG.md", .. docs];
    }

    // ---------------------------------------------------------------- the checks

    [GeneratedRegex(@"^```\s*([A-Za-z0-9_-]*)\s*$")]
    private static partial Regex FenceLine();

    /// <summary>A fenced code block: its language (empty when none) and its lines.</summary>
    internal sealed record CodeBlock(string Language, IReadOnlyList<string> Lines);

    internal static List<CodeBlock> CodeBlocks(string markdown)
    {
        var blocks = new List<CodeBlock>();
        List<string>? current = null;
        var language = "";
        foreach (var raw in markdown.Replace("\r\n", "\n", StringComparison.Ordinal).Split('\n'))
        {
            var m = FenceLine().Match(raw.Trim());
            if (m.Success)
            {
                if (current is null)
                {
                    current = [];
                    language = m.Groups[1].Value;
                }
                else
                {
                    blocks.Add(new CodeBlock(language, current));
                    current = null;
                }
                continue;
            }
            current?.Add(raw);
        }
        return blocks;
    }

    /// <summary>The words of a shell command up to its first operator, pipe, redirection or comment; leading VAR=value words dropped.</summary>
    internal static List<string> CommandWords(string line)
    {
        var words = new List<string>();
        foreach (var w in DocsChecks.Words(line))
        {
            if (w is "|" or "||" or "&&" or ";" or "&" || w.StartsWith('#') || w.StartsWith('>') || w.StartsWith('<') || w.StartsWith("2>", StringComparison.Ordinal)) break;
            if (words.Count == 0 && Regex.IsMatch(w, "^[A-Z_][A-Z0-9_]*=")) continue;
            words.Add(w.TrimEnd(';'));
            if (w.EndsWith(';')) break;
        }
        return words;
    }

    private static string ProgramOf(string word) => word[(word.LastIndexOf('/') + 1)..];

    /// <summary>
    /// The executable a doc line runs and its arguments as the real command line takes them, or null when the line
    /// runs none of ours (the benchmark tool `bench` is one of ours).
    /// </summary>
    private static (string Exe, List<string> Args)? Resolve(List<string> words)
    {
        if (words.Count == 0) return null;
        var facts = DeployFacts.Current;
        var program = ProgramOf(words[0]);
        var args = words.Skip(1).ToList();
        if (program == BenchExe) return (BenchExe, args);
        if (!facts.Executables.Contains(program)) return null;
        return (program, args);
    }

    /// <summary>The languages of the code blocks whose lines are shell commands (a block without one counts as shell).</summary>
    private static readonly HashSet<string> ShellLanguages = new(StringComparer.Ordinal) { "", "bash", "sh", "shell", "console", "zsh" };

    /// <summary>Problems with the command lines of a document's shell code blocks (a leading "$ " prompt is dropped).</summary>
    internal static List<string> CommandProblems(string name, string markdown)
    {
        var problems = new List<string>();
        foreach (var block in CodeBlocks(markdown).Where(b => ShellLanguages.Contains(b.Language)))
        {
            var joined = new StringBuilder();
            foreach (var raw in block.Lines)
            {
                var line = raw.Trim();
                if (joined.Length == 0 && line.StartsWith("$ ", StringComparison.Ordinal)) line = line[2..];
                if (line.EndsWith('\\'))
                {
                    joined.Append(line[..^1]).Append(' ');
                    continue;
                }
                joined.Append(line);
                var command = joined.ToString().Trim();
                joined.Clear();
                if (command.Length == 0 || command.StartsWith('#')) continue;
                var where = $"{name}: `{command}`";
                if (Resolve(CommandWords(command)) is not { } inv) continue;
                CliInvocation.Parse(DeployFacts.Current, inv.Exe, inv.Args, where, problems);
            }
        }
        return problems;
    }

    [GeneratedRegex(@"(?<![\w-])--[a-z][a-z0-9-]*")]
    private static partial Regex Flag();

    /// <summary>
    /// Problems with a document's synopsis blocks (```text): a line that starts with one of our executables names a verb
    /// it has, and every --flag on it and on the indented lines after it is one that verb takes.
    /// </summary>
    internal static List<string> SynopsisProblems(string name, string markdown)
    {
        var problems = new List<string>();
        var facts = DeployFacts.Current;
        foreach (var block in CodeBlocks(markdown).Where(b => b.Language == "text"))
        {
            HashSet<string>? options = null;
            var verb = "";
            foreach (var raw in block.Lines)
            {
                if (raw.Trim().Length == 0) continue;
                if (!char.IsWhiteSpace(raw[0]))
                {
                    options = null;
                    var words = raw.Split(' ', StringSplitOptions.RemoveEmptyEntries).ToList();
                    var where = $"{name}: `{raw.Trim()}`";
                    if (Resolve(words) is not { } inv) continue;
                    var root = facts.Cli(inv.Exe);
                    Command command = root;
                    if (inv.Exe == facts.CoordinatorExe || inv.Exe == BenchExe)
                    {
                        var sub = inv.Args.FirstOrDefault() ?? "";
                        if (root.Subcommands.FirstOrDefault(c => c.Name == sub) is not { } found)
                        {
                            problems.Add($"{where}: {inv.Exe} has no verb '{sub}' (it has: {string.Join(", ", root.Subcommands.Select(c => c.Name))})");
                            continue;
                        }
                        command = found;
                    }
                    verb = command == root ? inv.Exe : $"{inv.Exe} {command.Name}";
                    options = command.Options.Concat(root.Options.Where(o => o.Recursive))
                        .SelectMany(o => o.Aliases.Append(o.Name)).ToHashSet(StringComparer.Ordinal);
                }
                if (options is null) continue;
                foreach (Match m in Flag().Matches(raw))
                    if (!options.Contains(m.Value)) problems.Add($"{name}: the synopsis of {verb} shows {m.Value}, which {verb} does not take");
            }
        }
        return problems;
    }

    [GeneratedRegex(@"!?\[(?<text>[^\]]*)\]\((?<target>[^)\s]+)(\s+""[^""]*"")?\)")]
    private static partial Regex Link();

    [GeneratedRegex(@"^(#{1,6})\s+(.+?)\s*#*\s*$")]
    private static partial Regex Heading();

    /// <summary>The markdown outside fenced code blocks, with inline code spans blanked (links inside code are not links).</summary>
    private static IEnumerable<string> ProseLines(string markdown, bool blankCode = true)
    {
        var inBlock = false;
        foreach (var raw in markdown.Replace("\r\n", "\n", StringComparison.Ordinal).Split('\n'))
        {
            if (FenceLine().IsMatch(raw.Trim()))
            {
                inBlock = !inBlock;
                continue;
            }
            if (!inBlock) yield return blankCode ? Regex.Replace(raw, "`[^`]*`", m => new string(' ', m.Length)) : raw;
        }
    }

    /// <summary>GitHub's anchor of a heading: the rendered text lower-cased, punctuation dropped, spaces as hyphens.</summary>
    internal static string Slug(string heading)
    {
        var text = Regex.Replace(heading, @"!?\[([^\]]*)\]\([^)]*\)", "$1").Replace("`", "", StringComparison.Ordinal).Replace("*", "", StringComparison.Ordinal);
        var sb = new StringBuilder();
        foreach (var ch in text.Trim().ToLowerInvariant())
        {
            if (char.IsLetterOrDigit(ch) || ch is '-' or '_') sb.Append(ch);
            else if (ch == ' ') sb.Append('-');
        }
        return sb.ToString();
    }

    /// <summary>The anchors of a document's headings (a repeated heading gets -1, -2, ... as on GitHub).</summary>
    internal static HashSet<string> Anchors(string markdown)
    {
        var anchors = new HashSet<string>(StringComparer.Ordinal);
        var counts = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var line in ProseLines(markdown, blankCode: false))
        {
            var m = Heading().Match(line);
            if (!m.Success) continue;
            var slug = Slug(m.Groups[2].Value);
            var n = counts.GetValueOrDefault(slug);
            counts[slug] = n + 1;
            anchors.Add(n == 0 ? slug : $"{slug}-{n.ToString(CultureInfo.InvariantCulture)}");
        }
        return anchors;
    }

    /// <summary>
    /// Problems with a document's relative links: <paramref name="name"/> is its path in the repository,
    /// <paramref name="read"/> gives the text of another repository file (null when it does not exist),
    /// <paramref name="isDirectory"/> whether a path is a folder.
    /// </summary>
    internal static List<string> LinkProblems(string name, string markdown, Func<string, string?> read, Func<string, bool> isDirectory)
    {
        var problems = new List<string>();
        var folder = Path.GetDirectoryName(name)?.Replace('\\', '/') ?? "";
        foreach (var line in ProseLines(markdown))
        {
            foreach (Match m in Link().Matches(line))
            {
                var target = m.Groups["target"].Value;
                if (Regex.IsMatch(target, "^[a-z][a-z0-9+.-]*:", RegexOptions.IgnoreCase)) continue; // https:, mailto:
                var hash = target.IndexOf('#', StringComparison.Ordinal);
                var file = hash < 0 ? target : target[..hash];
                var anchor = hash < 0 ? null : Uri.UnescapeDataString(target[(hash + 1)..]);
                var path = file.Length == 0 ? name : Normalize(folder.Length == 0 ? file : $"{folder}/{file}");
                if (path is null)
                {
                    problems.Add($"{name}: the link ({target}) leaves the repository");
                    continue;
                }
                if (isDirectory(path))
                {
                    if (anchor is not null) problems.Add($"{name}: the link ({target}) gives an anchor in a folder");
                    continue;
                }
                var text = file.Length == 0 ? markdown : read(path);
                if (text is null)
                {
                    problems.Add($"{name}: the link ({target}) points at {path}, which does not exist");
                    continue;
                }
                if (anchor is null || !path.EndsWith(".md", StringComparison.Ordinal)) continue;
                var anchors = Anchors(text);
                if (!anchors.Contains(anchor))
                    problems.Add($"{name}: the link ({target}) names #{anchor}, which is no heading of {path} (its headings: {string.Join(", ", anchors.Order(StringComparer.Ordinal))})");
            }
        }
        return problems;
    }

    /// <summary>a/b/../c to a/c; null when the path climbs above the repository.</summary>
    private static string? Normalize(string path)
    {
        var parts = new List<string>();
        foreach (var part in path.Split('/'))
        {
            if (part is "" or ".") continue;
            if (part == "..")
            {
                if (parts.Count == 0) return null;
                parts.RemoveAt(parts.Count - 1);
            }
            else parts.Add(part);
        }
        return string.Join('/', parts);
    }

    private static string? ReadRepoFile(string relative) => File.Exists(RepoFiles.PathOf(relative)) ? RepoFiles.Read(relative) : null;

    private static bool IsRepoFolder(string relative) => Directory.Exists(RepoFiles.PathOf(relative));

    // ---------------------------------------------------------------- the repository's documents

    [Fact]
    public void Every_command_in_the_docs_parses_with_the_real_command_lines()
    {
        var problems = Documents().Where(d => File.Exists(RepoFiles.PathOf(d)))
            .SelectMany(d => CommandProblems(d, RepoFiles.Read(d)).Concat(SynopsisProblems(d, RepoFiles.Read(d)))).ToList();
        ManifestTests.AssertNone(problems);
    }

    [Fact]
    public void Every_relative_link_points_at_a_file_and_heading_that_exist()
    {
        var problems = Documents().SelectMany(d => File.Exists(RepoFiles.PathOf(d))
            ? LinkProblems(d, RepoFiles.Read(d), ReadRepoFile, IsRepoFolder)
            : [$"{d} does not exist"]).ToList();
        ManifestTests.AssertNone(problems);
    }

    /// <summary>A problem when the README is longer than <see cref="ReadmeMaxLines"/>; null otherwise.</summary>
    internal static string? ReadmeLengthProblem(string readme)
    {
        var lines = readme.Replace("\r\n", "\n", StringComparison.Ordinal).TrimEnd('\n').Split('\n').Length;
        return lines <= ReadmeMaxLines ? null : $"README.md has {lines} lines; at most {ReadmeMaxLines}: move the depth into docs/ (docs/index.md lists the pages)";
    }

    [Fact]
    public void The_readme_is_short()
    {
        Assert.Null(ReadmeLengthProblem(RepoFiles.Read("README.md")));
    }

    [Fact]
    public void Docs_index_lists_every_page()
    {
        var index = RepoFiles.Read("docs/index.md");
        var missing = Documents().Where(d => d.StartsWith("docs/", StringComparison.Ordinal) && d != "docs/index.md")
            .Where(d => !index.Contains($"({Path.GetFileName(d)})", StringComparison.Ordinal)).ToList();
        Assert.True(missing.Count == 0, "docs/index.md does not link " + string.Join(", ", missing));
    }

    // ---------------------------------------------------------------- the checks can fail

    private static readonly Dictionary<string, string> FakeRepo = new(StringComparer.Ordinal)
    {
        ["docs/a.md"] = "# Page A\n\n## The `run` verb\n\nText.\n\n## Step protocol\n\n## Step protocol\n",
        ["src/x.cs"] = "class X {}",
    };

    private static List<string> FakeLinks(string name, string markdown) =>
        LinkProblems(name, markdown, p => FakeRepo.GetValueOrDefault(p), p => p is "src" or "docs");

    [Theory]
    [InlineData("README.md", "See [A](docs/b.md).", "points at docs/b.md, which does not exist")]
    [InlineData("README.md", "See [A](docs/a.md#the-run-command).", "names #the-run-command, which is no heading of docs/a.md")]
    [InlineData("docs/a.md", "See [x](src/x.cs).", "points at docs/src/x.cs, which does not exist")]
    [InlineData("docs/a.md", "See [up](../../x.md).", "leaves the repository")]
    [InlineData("README.md", "![shot](docs/missing.png)", "points at docs/missing.png")]
    [InlineData("docs/a.md", "# Here\n\nSee [below](#there).", "names #there")]
    public void A_bad_link_is_reported(string name, string markdown, string expected)
    {
        var problems = FakeLinks(name, markdown);
        Assert.True(problems.Any(p => p.Contains(expected, StringComparison.Ordinal)), $"no problem mentions '{expected}'; got:\n  " + string.Join("\n  ", problems));
    }

    [Theory]
    [InlineData("README.md", "See [A](docs/a.md), [run](docs/a.md#the-run-verb), [again](docs/a.md#step-protocol-1) and [code](src/x.cs).")]
    [InlineData("docs/a.md", "[x](../src/x.cs), [folder](../src), [web](https://example.org/a.md), `[not](a link)`, [self](#here)\n\n# Here")]
    [InlineData("README.md", "```bash\n[not](a-link.md)\n```")]
    public void A_good_link_passes(string name, string markdown)
    {
        Assert.Empty(FakeLinks(name, markdown));
    }

    [Theory]
    [InlineData("coordinator train --recipe swissroll --stepz 300 --out /tmp/x", "has no option --stepz")]
    [InlineData("coordinator trian --recipe swissroll --out /tmp/x", "trian")]
    [InlineData("worker --coordinator http://127.0.0.1:50051 --gpu 0", "has no option --gpu")]
    [InlineData("bench exchange --recipe swissroll --stepz 100", "has no option --stepz")]
    [InlineData("bench exchnage --steps 100", "Unrecognized command or argument 'exchnage'")]
    [InlineData("src/Coordinator/bin/Release/net10.0/coordinator status --run runs/demo --jsn | head", "has no option --jsn")]
    public void A_wrong_command_is_reported(string command, string expected)
    {
        var problems = CommandProblems("README.md", "Text\n\n```bash\n" + command + "\n```\n");
        Assert.True(problems.Any(p => p.Contains(expected, StringComparison.Ordinal)), $"no problem mentions '{expected}'; got:\n  " + string.Join("\n  ", problems));
    }

    [Theory]
    [InlineData("coordinator train --recipe swissroll \\\n  --steps 300 --out /tmp/x   # a comment")]
    [InlineData("coordinator status --run runs/demo --json | head -3")]
    [InlineData("DISTDIFFUSION_TOKEN=x coordinator sample --address http://127.0.0.1:50051 --n 4 --out a.png > log 2>&1")]
    [InlineData("coordinator recipes --show swissroll > my.json")]
    [InlineData("bench soak --steps 3000 --reference-step 300")]
    public void A_right_command_passes(string command)
    {
        Assert.Empty(CommandProblems("README.md", "```sh\n" + command + "\n```\n"));
    }

    [Theory]
    [InlineData("```console\n$ coordinator status --run runs/demo --jsn\n```\n", true)]
    [InlineData("```yaml\ncommand: coordinator serve --bogus\n- coordinator --bogus\n```\n", false)]
    [InlineData("```text\nworker       host             device\n```\n", false)]
    public void Only_shell_blocks_are_parsed_as_commands(string markdown, bool reported)
    {
        var problems = CommandProblems("docs/x.md", markdown);
        Assert.True(problems.Count > 0 == reported, $"expected {(reported ? "a problem" : "none")}; got:\n  " + string.Join("\n  ", problems));
    }

    [Theory]
    [InlineData("coordinator train --recipe NAME [--stepz N] --out DIR", "coordinator train shows --stepz")]
    [InlineData("coordinator train --recipe NAME --out DIR\n                  [--keep-everything K]", "shows --keep-everything")]
    [InlineData("coordinator benchmark-nothing [--steps N]", "has no verb 'benchmark-nothing'")]
    [InlineData("worker --coordinator URL [--transport socket|grpc|carrier-pigeon] [--gpu N]", "worker shows --gpu")]
    [InlineData("bench chaos [--kill-every K] [--kill-all]", "bench chaos shows --kill-all")]
    public void A_wrong_synopsis_is_reported(string synopsis, string expected)
    {
        var problems = SynopsisProblems("README.md", "```text\n" + synopsis + "\n```\n");
        Assert.True(problems.Any(p => p.Contains(expected, StringComparison.Ordinal)), $"no problem mentions '{expected}'; got:\n  " + string.Join("\n  ", problems));
    }

    [Fact]
    public void A_long_readme_is_reported()
    {
        Assert.Contains("261 lines", ReadmeLengthProblem(string.Concat(Enumerable.Repeat("line\n", ReadmeMaxLines + 1))), StringComparison.Ordinal);
        Assert.Null(ReadmeLengthProblem(string.Concat(Enumerable.Repeat("line\r\n", ReadmeMaxLines))));
    }
}
