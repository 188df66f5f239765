using System.Globalization;
using System.Text;
using Grpc.Core;

namespace DistDiffusion.Protocol;

/// <summary>
/// Strings that arrive from peers: names are bounded and may hold no control characters (a newline in a host name
/// would forge log lines); free-form texts (reasons, error messages) are escaped and cut before anyone logs or
/// stores them.
/// </summary>
public static class WireText
{
    /// <summary>Join.host: a DNS name is at most 253 characters.</summary>
    public const int MaxHost = 253;
    /// <summary>Join.device: "cpu", "cuda:0", ...</summary>
    public const int MaxDevice = 64;
    /// <summary>Join.boot_id: a UUID (36 characters).</summary>
    public const int MaxBootId = 64;
    /// <summary>Worker ids the coordinator handed out ("w12-3fa9c1"); anything longer is not one of them.</summary>
    public const int MaxWorkerId = 64;
    /// <summary>Free-form texts (a worker's error or reason) are cut to this many characters.</summary>
    public const int MaxFreeText = 2048;

    /// <summary>
    /// Throws InvalidArgument naming <paramref name="field"/> when <paramref name="value"/> is longer than
    /// <paramref name="limit"/> characters or holds a control, format or line-separator character.
    /// </summary>
    public static void CheckName(string value, string field, int limit)
    {
        if (value.Length > limit)
            throw new ProtocolException(StatusCode.InvalidArgument, $"{field} is {value.Length} characters long; the limit is {limit}", field);
        var bad = FirstControl(value);
        if (bad >= 0)
            throw new ProtocolException(StatusCode.InvalidArgument,
                $"{field} holds the control character U+{(int)value[bad]:X4} at index {bad}; names may hold printable characters only", field);
    }

    /// <summary>Index of the first character that could break or disguise a log line, or -1.</summary>
    public static int FirstControl(string value)
    {
        for (var i = 0; i < value.Length; i++)
            if (IsControl(value[i])) return i;
        return -1;
    }

    private static bool IsControl(char c) => char.GetUnicodeCategory(c) is UnicodeCategory.Control or UnicodeCategory.Format
        or UnicodeCategory.LineSeparator or UnicodeCategory.ParagraphSeparator or UnicodeCategory.Surrogate;

    /// <summary>
    /// <paramref name="value"/> safe to log and show: control characters written as \n, \r, \t or \uXXXX (and a
    /// backslash as \\), cut after <paramref name="limit"/> characters with a note of how many were left out.
    /// </summary>
    public static string Escape(string value, int limit = MaxFreeText)
    {
        var cut = value.Length > limit;
        var text = cut ? value[..limit] : value;
        if (FirstControl(text) < 0 && !text.Contains('\\', StringComparison.Ordinal))
            return cut ? $"{text}... ({value.Length - limit} more characters)" : text;
        var sb = new StringBuilder(text.Length + 16);
        foreach (var c in text)
        {
            switch (c)
            {
                case '\\': sb.Append(@"\\"); break;
                case '\n': sb.Append(@"\n"); break;
                case '\r': sb.Append(@"\r"); break;
                case '\t': sb.Append(@"\t"); break;
                default:
                    if (IsControl(c)) sb.Append(CultureInfo.InvariantCulture, $"\\u{(int)c:X4}");
                    else sb.Append(c);
                    break;
            }
        }
        if (cut) sb.Append(CultureInfo.InvariantCulture, $"... ({value.Length - limit} more characters)");
        return sb.ToString();
    }
}
