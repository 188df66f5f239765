using System.Security.Cryptography;
using System.Text;
using Grpc.Core;

namespace DistDiffusion.Protocol;

/// <summary>The shared cluster token: where it comes from and how it travels (`authorization: Bearer ...` metadata).</summary>
public static class Token
{
    /// <summary>
    /// The token from <paramref name="tokenFile"/> (trimmed; e.g. a mounted Kubernetes Secret) or else the
    /// DISTDIFFUSION_TOKEN environment variable; null when neither is set. A named file that is missing or empty is an error.
    /// </summary>
    public static string? Resolve(string? tokenFile, Func<string, string?>? environment = null)
    {
        if (!string.IsNullOrEmpty(tokenFile))
        {
            if (!File.Exists(tokenFile))
                throw new ArgumentException($"--token-file {tokenFile}: no such file");
            var text = File.ReadAllText(tokenFile).Trim();
            if (text.Length == 0)
                throw new ArgumentException($"--token-file {tokenFile}: the file is empty (expected the shared token)");
            return text;
        }
        var env = (environment ?? Environment.GetEnvironmentVariable)(Names.TokenEnvironmentVariable);
        return string.IsNullOrWhiteSpace(env) ? null : env.Trim();
    }

    /// <summary>A new random token: 32 bytes, URL-safe base64.</summary>
    public static string Generate() =>
        Convert.ToBase64String(RandomNumberGenerator.GetBytes(32)).TrimEnd('=').Replace('+', '-').Replace('/', '_');

    /// <summary>Writes a token file readable by its owner only (0600).</summary>
    public static void WriteFile(string path, string token)
    {
        var options = new FileStreamOptions { Mode = FileMode.Create, Access = FileAccess.Write };
        if (!OperatingSystem.IsWindows()) options.UnixCreateMode = UnixFileMode.UserRead | UnixFileMode.UserWrite;
        using (var stream = new FileStream(path, options))
            stream.Write(Encoding.UTF8.GetBytes(token + "\n"));
        if (!OperatingSystem.IsWindows()) File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite);
    }

    /// <summary>Metadata for a call: the bearer token, when there is one.</summary>
    public static Metadata Headers(string? token)
    {
        var m = new Metadata();
        if (token is not null) m.Add(Names.AuthorizationHeader, "Bearer " + token);
        return m;
    }

    /// <summary>Whether the metadata carries exactly this token (constant-time comparison).</summary>
    public static bool Matches(Metadata headers, string expected)
    {
        var value = headers.GetValue(Names.AuthorizationHeader);
        if (value is null || !value.StartsWith("Bearer ", StringComparison.Ordinal)) return false;
        var given = Encoding.UTF8.GetBytes(value["Bearer ".Length..].Trim());
        var want = Encoding.UTF8.GetBytes(expected);
        return CryptographicOperations.FixedTimeEquals(SHA256.HashData(given), SHA256.HashData(want));
    }
}
