using System.Text.Json;
using System.Text.RegularExpressions;
using System.Text;

namespace DistDiffusion.Tests.Deploy;

/// <summary>One instruction of a Dockerfile: its keyword (upper case), its arguments as written, and its line.</summary>
internal sealed record DockerInstruction(string Keyword, string Arguments, int Line)
{
    /// <summary>The flags before the arguments proper (COPY --from=build, FROM --platform=...), by name.</summary>
    public IReadOnlyDictionary<string, string> Flags => SplitFlags().Flags;

    /// <summary>The words after the flags (shell form, split on white space).</summary>
    public IReadOnlyList<string> Words => SplitFlags().Words;

    /// <summary>The exec (JSON array) form of ENTRYPOINT/CMD/RUN, or null for the shell form.</summary>
    public IReadOnlyList<string>? ExecForm
    {
        get
        {
            var text = Arguments.Trim();
            if (!text.StartsWith('[')) return null;
            try
            {
                return JsonSerializer.Deserialize<string[]>(text);
            }
            catch (JsonException)
            {
                return null;
            }
        }
    }

    private (Dictionary<string, string> Flags, List<string> Words) SplitFlags()
    {
        var flags = new Dictionary<string, string>(StringComparer.Ordinal);
        var words = new List<string>();
        foreach (var word in Arguments.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries))
        {
            if (words.Count == 0 && word.StartsWith("--", StringComparison.Ordinal))
            {
                var eq = word.IndexOf('=', StringComparison.Ordinal);
                flags[eq < 0 ? word[2..] : word[2..eq]] = eq < 0 ? "" : word[(eq + 1)..];
            }
            else
            {
                words.Add(word);
            }
        }
        return (flags, words);
    }
}

/// <summary>A build stage: its FROM (base as written, after global ARG defaults are substituted), its name and its instructions.</summary>
internal sealed record DockerStage(string BaseAsWritten, string Base, string? Name, int Index, IReadOnlyList<DockerInstruction> Instructions)
{
    public IEnumerable<DockerInstruction> All(string keyword) => Instructions.Where(i => i.Keyword == keyword);

    public DockerInstruction? Last(string keyword) => Instructions.LastOrDefault(i => i.Keyword == keyword);
}

/// <summary>
/// A small Dockerfile reader, enough for what the tests check offline: parser directives and comments,
/// line continuations, global ARGs (their defaults substituted into FROM lines), stages and their instructions.
/// </summary>
internal sealed partial class DockerfileModel
{
    private DockerfileModel(IReadOnlyDictionary<string, string?> globalArgs, IReadOnlyList<DockerStage> stages)
    {
        GlobalArgs = globalArgs;
        Stages = stages;
    }

    /// <summary>ARGs declared before the first FROM, with their defaults (null: none).</summary>
    public IReadOnlyDictionary<string, string?> GlobalArgs { get; }
    public IReadOnlyList<DockerStage> Stages { get; }

    public DockerStage? Stage(string name) => Stages.FirstOrDefault(s => string.Equals(s.Name, name, StringComparison.OrdinalIgnoreCase));

    public static DockerfileModel Parse(string text)
    {
        var instructions = new List<DockerInstruction>();
        var lines = text.Replace("\r\n", "\n", StringComparison.Ordinal).Split('\n');
        var current = new StringBuilder();
        var startLine = 0;
        for (var i = 0; i < lines.Length; i++)
        {
            var line = lines[i];
            var trimmed = line.TrimStart();
            // Comments (and parser directives, which look like comments) are dropped, also inside a continued instruction.
            if (trimmed.StartsWith('#')) continue;
            if (current.Length == 0)
            {
                if (trimmed.Length == 0) continue;
                startLine = i + 1;
            }
            var body = line.TrimEnd();
            if (body.EndsWith('\\'))
            {
                current.Append(body[..^1]).Append(' ');
                continue;
            }
            current.Append(body);
            var full = current.ToString().Trim();
            current.Clear();
            var space = full.IndexOfAny([' ', '\t']);
            instructions.Add(space < 0
                ? new DockerInstruction(full.ToUpperInvariant(), "", startLine)
                : new DockerInstruction(full[..space].ToUpperInvariant(), full[(space + 1)..].Trim(), startLine));
        }
        if (current.Length > 0) throw new FormatException("the Dockerfile ends inside a continued line");

        var globals = new Dictionary<string, string?>(StringComparer.Ordinal);
        var stages = new List<DockerStage>();
        DockerInstruction? from = null;
        var body2 = new List<DockerInstruction>();
        void Close()
        {
            if (from is null) return;
            var words = from.Words;
            if (words.Count is not (1 or 3) || (words.Count == 3 && !words[1].Equals("AS", StringComparison.OrdinalIgnoreCase)))
                throw new FormatException($"line {from.Line}: FROM {from.Arguments}: expected FROM [--platform=...] IMAGE [AS NAME]");
            stages.Add(new DockerStage(words[0], Substitute(words[0], globals), words.Count == 3 ? words[2] : null, stages.Count, body2.ToList()));
            body2.Clear();
        }
        foreach (var ins in instructions)
        {
            if (ins.Keyword == "FROM")
            {
                Close();
                from = ins;
            }
            else if (from is null)
            {
                if (ins.Keyword != "ARG") throw new FormatException($"line {ins.Line}: {ins.Keyword} before the first FROM");
                var eq = ins.Arguments.IndexOf('=', StringComparison.Ordinal);
                if (eq < 0) globals[ins.Arguments.Trim()] = null;
                else globals[ins.Arguments[..eq].Trim()] = ins.Arguments[(eq + 1)..].Trim().Trim('"');
            }
            else
            {
                body2.Add(ins);
            }
        }
        Close();
        if (stages.Count == 0) throw new FormatException("no FROM instruction");
        return new DockerfileModel(globals, stages);
    }

    /// <summary>$NAME and ${NAME} replaced by the given values (unknown names stay as written).</summary>
    public static string Substitute(string text, IReadOnlyDictionary<string, string?> values) =>
        VariablePattern().Replace(text, m =>
        {
            var name = m.Groups[1].Success ? m.Groups[1].Value : m.Groups[2].Value;
            return values.TryGetValue(name, out var v) && v is not null ? v : m.Value;
        });

    [GeneratedRegex(@"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")]
    private static partial Regex VariablePattern();
}
