namespace DistDiffusion.Model;

/// <summary>How C# names are spelled in recipes, on the command line and in messages.</summary>
internal static class Naming
{
    /// <summary>PascalCase to kebab-case: <c>LearningRate</c> to <c>learning-rate</c>, <c>Gaussians8</c> to <c>gaussians8</c>.</summary>
    public static string Kebab(string pascal)
    {
        var sb = new System.Text.StringBuilder();
        for (var i = 0; i < pascal.Length; i++)
        {
            var c = pascal[i];
            if (char.IsUpper(c) && i > 0 && !char.IsUpper(pascal[i - 1])) sb.Append('-');
            else if (char.IsUpper(c) && i > 0 && i + 1 < pascal.Length && char.IsLower(pascal[i + 1])) sb.Append('-');
            sb.Append(char.ToLowerInvariant(c));
        }
        return sb.ToString();
    }
}
