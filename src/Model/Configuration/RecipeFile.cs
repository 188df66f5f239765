using System.Text.Json;

namespace DistDiffusion.Model.Configuration;

/// <summary>
/// A recipe written as JSON, for `--recipe FILE.json`: one object whose members are recipe fields, named as --set names
/// them (learning-rate) or as a run's recipe.json and `coordinator recipes --show` write them (LearningRate). Each value
/// is read as --set reads its text (a JSON array of integers as a comma-separated list), fields left out keep
/// <see cref="Recipe"/>'s defaults, and the whole is validated by <see cref="Recipe.Validate"/>: a bad value gets --set's
/// message, naming the field, the value and what was expected; an unknown field is an error; a file that is not JSON is
/// named with the line and column where reading stopped. Every error is an <see cref="ArgumentException"/> starting
/// with the file's name.
/// </summary>
public static class RecipeFile
{
    /// <summary>Whether a --recipe value names a file (NAME.json) rather than a built-in recipe.</summary>
    public static bool IsFileName(string nameOrPath) =>
        nameOrPath.EndsWith(".json", StringComparison.OrdinalIgnoreCase);

    /// <summary>The recipe in <paramref name="path"/>, validated.</summary>
    public static Recipe Load(string path)
    {
        string text;
        try
        {
            text = File.ReadAllText(path);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            throw new ArgumentException($"recipe file {path}: no such file ({Path.GetFullPath(path)})", e);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ArgumentException($"recipe file {path}: cannot be read: {e.Message}", e);
        }
        return Parse(text, path);
    }

    /// <summary>The recipe written in <paramref name="json"/>, validated; <paramref name="source"/> names it in errors.</summary>
    public static Recipe Parse(string json, string source)
    {
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(json);
        }
        catch (JsonException e)
        {
            throw new ArgumentException($"recipe file {source}: not valid JSON at line {e.LineNumber + 1}, column {e.BytePositionInLine + 1}: {Reason(e)}", e);
        }
        using (document)
        {
            var root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object)
                throw new ArgumentException($"recipe file {source}: expected a JSON object of recipe fields, found {Kind(root.ValueKind)}");
            var recipe = new Recipe();
            var seen = new Dictionary<string, string>(StringComparer.Ordinal);
            try
            {
                foreach (var field in root.EnumerateObject())
                {
                    if (!seen.TryAdd(Recipe.Normalize(field.Name), field.Name))
                        throw new ArgumentException($"recipe field '{field.Name}' is given twice (also as '{seen[Recipe.Normalize(field.Name)]}')");
                    recipe = recipe.With(field.Name, field.Value);
                }
                recipe.Validate();
            }
            catch (ArgumentException e)
            {
                throw new ArgumentException($"recipe file {source}: {e.Message}", e);
            }
            return recipe;
        }
    }

    /// <summary>System.Text.Json's message without the position it appends (given above, counted from 1).</summary>
    private static string Reason(JsonException e)
    {
        var message = e.Message;
        foreach (var tail in new[] { " Path: ", " LineNumber: " })
        {
            var at = message.IndexOf(tail, StringComparison.Ordinal);
            if (at > 0) message = message[..at];
        }
        return message.Trim();
    }

    internal static string Kind(JsonValueKind kind) => kind switch
    {
        JsonValueKind.Object => "an object",
        JsonValueKind.Array => "an array",
        JsonValueKind.String => "a string",
        JsonValueKind.Number => "a number",
        JsonValueKind.True or JsonValueKind.False => "a boolean",
        JsonValueKind.Null => "null",
        _ => "nothing",
    };
}
