using System.IO.Compression;
using System.Net.Sockets;
using System.Security.Cryptography;

namespace DistDiffusion.Model.Data;

/// <summary>One file of a release: name, MD5 of the .gz archive (torchvision's list) and MD5 of its decompressed contents.</summary>
public sealed record RemoteFile(string Name, string ArchiveMd5, string ContentMd5);

/// <summary>
/// Downloads MNIST / Fashion-MNIST (train + t10k, images + labels, gzip) into a folder. Each file goes to a
/// temporary name in the target folder, is checked against the well-known MD5 sums (those torchvision uses)
/// and only then renamed into place, so a failed or corrupt download never leaves a file under the real name.
/// </summary>
public static class DatasetDownloader
{
    /// <summary>Default mirror of MNIST (torchvision's first choice; the original host now needs a login).</summary>
    public static Uri MnistBaseUri { get; } = new("https://ossci-datasets.s3.amazonaws.com/mnist/");

    /// <summary>Default host of Fashion-MNIST (as in torchvision).</summary>
    public static Uri FashionMnistBaseUri { get; } = new("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/");

    public static IReadOnlyList<RemoteFile> MnistFiles { get; } =
    [
        new("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
        new("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
        new("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
        new("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
    ];

    public static IReadOnlyList<RemoteFile> FashionMnistFiles { get; } =
    [
        new("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        new("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        new("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        new("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    ];

    public static IReadOnlyList<RemoteFile> FilesOf(DatasetKind kind) => kind switch
    {
        DatasetKind.Mnist => MnistFiles,
        DatasetKind.FashionMnist => FashionMnistFiles,
        _ => throw new ArgumentException($"only Mnist and FashionMnist can be downloaded, not {kind}", nameof(kind)),
    };

    /// <summary>
    /// Downloads the four files of <paramref name="kind"/> into <paramref name="folder"/> (created if needed),
    /// skipping files already present with a good checksum. Throws <see cref="IOException"/> when the host
    /// cannot be reached (the message names the URL and says the machine appears offline), on an HTTP error
    /// status, or on a checksum mismatch; no partial or unverified file is left behind.
    /// </summary>
    public static Task DownloadAsync(DatasetKind kind, string folder, HttpClient? http = null, Uri? baseUri = null, CancellationToken ct = default)
    {
        var files = FilesOf(kind);
        return DownloadFilesAsync(files, folder, http, baseUri ?? (kind == DatasetKind.Mnist ? MnistBaseUri : FashionMnistBaseUri), ct);
    }

    /// <summary>Downloads the given files (tests use a subset) from <paramref name="baseUri"/> into <paramref name="folder"/>.</summary>
    internal static async Task DownloadFilesAsync(IReadOnlyList<RemoteFile> files, string folder, HttpClient? http, Uri baseUri, CancellationToken ct)
    {
        ArgumentException.ThrowIfNullOrEmpty(folder);
        ArgumentNullException.ThrowIfNull(baseUri);
        Directory.CreateDirectory(folder);
        if (!baseUri.AbsoluteUri.EndsWith('/')) baseUri = new Uri(baseUri.AbsoluteUri + "/");
        var owned = http is null;
#pragma warning disable CA2000 // disposed in the finally below when this method created it (owned); a caller's client stays the caller's
        http ??= new HttpClient { Timeout = TimeSpan.FromMinutes(10) };
#pragma warning restore CA2000
        try
        {
            foreach (var file in files)
            {
                var target = Path.Combine(folder, file.Name);
                if (File.Exists(target) && await HasGoodChecksumAsync(target, file, ct).ConfigureAwait(false))
                    continue;
                await DownloadOneAsync(http, new Uri(baseUri, file.Name), target, file, ct).ConfigureAwait(false);
            }
        }
        finally
        {
            if (owned) http.Dispose();
        }
    }

    private static async Task DownloadOneAsync(HttpClient http, Uri url, string target, RemoteFile file, CancellationToken ct)
    {
        var temp = target + $".{Environment.ProcessId}.{Guid.NewGuid():N}.part";
        try
        {
            try
            {
                using var response = await http.GetAsync(url, HttpCompletionOption.ResponseHeadersRead, ct).ConfigureAwait(false);
                if (!response.IsSuccessStatusCode)
                    throw new IOException($"download of {url} failed: HTTP {(int)response.StatusCode} {response.ReasonPhrase}");
                await using var body = await response.Content.ReadAsStreamAsync(ct).ConfigureAwait(false);
                await using var output = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 1 << 16, useAsync: true);
                await body.CopyToAsync(output, ct).ConfigureAwait(false);
            }
            catch (HttpRequestException e)
            {
                throw Unreachable(url, e);
            }
            catch (TaskCanceledException e) when (!ct.IsCancellationRequested)
            {
                throw new IOException($"download of {url} timed out after {http.Timeout.TotalSeconds:0} s: the machine appears offline or the host is unreachable", e);
            }
            catch (IOException e) when (e.InnerException is SocketException)
            {
                throw Unreachable(url, e);
            }

            var (archiveMd5, contentMd5) = await ChecksumsAsync(temp, ct).ConfigureAwait(false);
            if (!Matches(file, archiveMd5, contentMd5))
                throw new IOException(
                    $"checksum mismatch for {url}: got MD5 {archiveMd5} (decompressed: {contentMd5 ?? "not gzip"}), expected {file.ArchiveMd5} (or decompressed {file.ContentMd5}); the file was discarded");
            File.Move(temp, target, overwrite: true);
        }
        finally
        {
            try { File.Delete(temp); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        }
    }

    private static IOException Unreachable(Uri url, Exception e)
    {
        var reason = e.InnerException?.Message ?? e.Message;
        return new IOException($"could not download {url}: the machine appears offline or {url.Host} is unreachable ({reason})", e);
    }

    private static bool Matches(RemoteFile file, string archiveMd5, string? contentMd5) =>
        string.Equals(archiveMd5, file.ArchiveMd5, StringComparison.OrdinalIgnoreCase)
        || (contentMd5 is not null && string.Equals(contentMd5, file.ContentMd5, StringComparison.OrdinalIgnoreCase));

    /// <summary>
    /// True when the file's MD5 is the well-known archive MD5, or (for a re-compressed copy such as the one
    /// committed under data/mnist) its decompressed contents have the well-known MD5.
    /// </summary>
    public static async Task<bool> HasGoodChecksumAsync(string path, RemoteFile file, CancellationToken ct = default)
    {
        var (archiveMd5, contentMd5) = await ChecksumsAsync(path, ct).ConfigureAwait(false);
        return Matches(file, archiveMd5, contentMd5);
    }

    /// <summary>MD5 of the file and, if it is gzip data, of its decompressed contents (null otherwise), lower-case hex.</summary>
    // MD5 is what the dataset publishers and torchvision list: it checks against corruption, not tampering.
#pragma warning disable CA5351
    public static async Task<(string ArchiveMd5, string? ContentMd5)> ChecksumsAsync(string path, CancellationToken ct = default)
    {
        string archive;
        await using (var s = File.OpenRead(path))
            archive = Convert.ToHexStringLower(await MD5.HashDataAsync(s, ct).ConfigureAwait(false));
        string? content = null;
        try
        {
            await using var s = File.OpenRead(path);
            var magic = new byte[2];
            if (await s.ReadAsync(magic, ct).ConfigureAwait(false) == 2 && magic[0] == 0x1f && magic[1] == 0x8b)
            {
                s.Position = 0;
                await using var gz = new GZipStream(s, CompressionMode.Decompress);
                content = Convert.ToHexStringLower(await MD5.HashDataAsync(gz, ct).ConfigureAwait(false));
            }
        }
        catch (InvalidDataException)
        {
            content = null;
        }
        return (archive, content);
    }
#pragma warning restore CA5351
}
