using System.Security.Cryptography;
using System.Text;
using Grpc.Core;

namespace DistDiffusion.Protocol;

/// <summary>The cluster's tokens (shared, worker, client): where they come from and how they travel (`authorization: Bearer ...` metadata).</summary>
public static class Token
{
    /// <summary>
    /// The token from <paramref name="tokenFile"/> (trimmed; e.g. a mounted Kubernetes Secret) or else the
    /// DISTDIFFUSION_TOKEN environment variable; null when neither is set. A named file that is missing or empty is an error.
    /// </summary>
    public static string? Resolve(string? tokenFile, Func<string, string?>? environment = null) =>
        Resolve(tokenFile, "--token-file", [Names.TokenEnvironmentVariable], environment);

    /// <summary>
    /// The token from <paramref name="tokenFile"/> (trimmed; <paramref name="flag"/> names it in errors) or else the first
    /// of <paramref name="variables"/> that is set; null when none is. A named file that is missing or empty is an error.
    /// </summary>
    public static string? Resolve(string? tokenFile, string flag, IReadOnlyList<string> variables, Func<string, string?>? environment = null)
    {
        if (!string.IsNullOrEmpty(tokenFile))
        {
            if (!File.Exists(tokenFile))
                throw new ArgumentException($"{flag} {tokenFile}: no such file");
            var text = File.ReadAllText(tokenFile).Trim();
            if (text.Length == 0)
                throw new ArgumentException($"{flag} {tokenFile}: the file is empty (expected a token)");
            return text;
        }
        foreach (var variable in variables)
        {
            var env = (environment ?? Environment.GetEnvironmentVariable)(variable);
            if (!string.IsNullOrWhiteSpace(env)) return env.Trim();
        }
        return null;
    }

    /// <summary>The token a worker presents: --token-file, else DISTDIFFUSION_WORKER_TOKEN, else DISTDIFFUSION_TOKEN.</summary>
    public static string? ResolveWorker(string? tokenFile, Func<string, string?>? environment = null) =>
        Resolve(tokenFile, "--token-file", [Names.WorkerTokenEnvironmentVariable, Names.TokenEnvironmentVariable], environment);

    /// <summary>The token a client (`status`, `sample`) presents: --token-file, else DISTDIFFUSION_CLIENT_TOKEN, else DISTDIFFUSION_TOKEN.</summary>
    public static string? ResolveClient(string? tokenFile, Func<string, string?>? environment = null) =>
        Resolve(tokenFile, "--token-file", [Names.ClientTokenEnvironmentVariable, Names.TokenEnvironmentVariable], environment);

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
    public static bool Matches(Metadata headers, string expected) => Matches(headers.GetValue(Names.AuthorizationHeader), expected);

    /// <summary>Whether an `authorization` header value is "Bearer " and exactly this token (constant-time comparison).</summary>
    public static bool Matches(string? authorization, string expected)
    {
        if (authorization is null || !authorization.StartsWith("Bearer ", StringComparison.Ordinal)) return false;
        var given = Encoding.UTF8.GetBytes(authorization["Bearer ".Length..].Trim());
        var want = Encoding.UTF8.GetBytes(expected);
        return CryptographicOperations.FixedTimeEquals(SHA256.HashData(given), SHA256.HashData(want));
    }
}
