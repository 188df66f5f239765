using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using DistDiffusion.Model.Data;

namespace DistDiffusion.Tests.Data;

public class DownloaderTests
{
    /// <summary>A tiny HTTP server on 127.0.0.1 serving fixed bytes per path (404 otherwise), counting requests.</summary>
    private sealed class LocalServer : IDisposable
    {
        private readonly HttpListener _listener = new();
        private readonly Dictionary<string, byte[]> _routes;
        private readonly Task _loop;

        public LocalServer(Dictionary<string, byte[]> routes)
        {
            _routes = routes;
            Port = FreePort();
            _listener.Prefixes.Add($"http://127.0.0.1:{Port}/");
            _listener.Start();
            _loop = Task.Run(LoopAsync);
        }

        public int Port { get; }

        public Uri BaseUri => new($"http://127.0.0.1:{Port}/mnist/");

        public ConcurrentQueue<string> Requests { get; } = new();

        private async Task LoopAsync()
        {
            while (_listener.IsListening)
            {
                HttpListenerContext ctx;
                try { ctx = await _listener.GetContextAsync(); }
                catch (Exception e) when (e is HttpListenerException or ObjectDisposedException or InvalidOperationException) { return; }
                var path = ctx.Request.Url!.AbsolutePath;
                Requests.Enqueue(path);
                if (_routes.TryGetValue(path, out var body))
                {
                    ctx.Response.StatusCode = 200;
                    ctx.Response.ContentType = "application/gzip";
                    ctx.Response.ContentLength64 = body.Length;
                    await ctx.Response.OutputStream.WriteAsync(body);
                }
                else
                {
                    ctx.Response.StatusCode = 404;
                }
                ctx.Response.Close();
            }
        }

        public void Dispose()
        {
            // Close alone: after Stop, .NET's managed HttpListener looks the port up again while closing and binds it
            // anew, which throws "Address already in use" when another test has taken the freed port meanwhile (seen in CI).
            _listener.Close();
            _loop.Wait(TimeSpan.FromSeconds(5));
        }
    }

    internal static int FreePort()
    {
        using var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        var port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }

    private static IReadOnlyList<RemoteFile> T10k =>
        DatasetDownloader.MnistFiles.Where(f => f.Name.StartsWith("t10k", StringComparison.Ordinal)).ToArray();

    private static Dictionary<string, byte[]> CommittedT10k() => new()
    {
        ["/mnist/t10k-images-idx3-ubyte.gz"] = File.ReadAllBytes(TestFiles.T10kImages),
        ["/mnist/t10k-labels-idx1-ubyte.gz"] = File.ReadAllBytes(TestFiles.T10kLabels),
    };

    [Fact]
    public async Task GoodChecksumPlacesTheFilesThenSkipsThem()
    {
        using var server = new LocalServer(CommittedT10k());
        using var tmp = new TempFolder();
        using var http = new HttpClient();
        var target = Path.Combine(tmp.Path, "mnist");
        await DatasetDownloader.DownloadFilesAsync(T10k, target, http, server.BaseUri, CancellationToken.None);
        Assert.Equal(File.ReadAllBytes(TestFiles.T10kImages), File.ReadAllBytes(Path.Combine(target, "t10k-images-idx3-ubyte.gz")));
        Assert.Equal(File.ReadAllBytes(TestFiles.T10kLabels), File.ReadAllBytes(Path.Combine(target, "t10k-labels-idx1-ubyte.gz")));
        Assert.Equal(2, Directory.GetFiles(target).Length);
        Assert.Equal(2, server.Requests.Count);

        // second run: both present with good checksums -> no request
        await DatasetDownloader.DownloadFilesAsync(T10k, target, http, server.BaseUri, CancellationToken.None);
        Assert.Equal(2, server.Requests.Count);
        using var ds = MnistFiles.Load(target, DatasetKind.Mnist);
        Assert.Equal(10000, ds.Count);
    }

    [Fact]
    public async Task BadChecksumThrowsAndLeavesNoFile()
    {
        var routes = CommittedT10k();
        routes["/mnist/t10k-labels-idx1-ubyte.gz"] = IdxReaderTests.Gzip(IdxReaderTests.Idx(2049, [10000], 10000));
        using var server = new LocalServer(routes);
        using var tmp = new TempFolder();
        using var http = new HttpClient();
        var e = await Assert.ThrowsAsync<IOException>(() => DatasetDownloader.DownloadFilesAsync(T10k, tmp.Path, http, server.BaseUri, CancellationToken.None));
        Assert.Contains("checksum mismatch", e.Message, StringComparison.Ordinal);
        Assert.Contains("t10k-labels-idx1-ubyte.gz", e.Message, StringComparison.Ordinal);
        Assert.Contains("ec29112dd5afa0611ce80d1b7f02629c", e.Message, StringComparison.Ordinal);
        Assert.False(File.Exists(tmp.File("t10k-labels-idx1-ubyte.gz")));
        // the good file before it was kept; nothing else (no .part leftovers)
        Assert.Equal(["t10k-images-idx3-ubyte.gz"], Directory.GetFiles(tmp.Path).Select(Path.GetFileName));
    }

    [Fact]
    public async Task CorruptExistingFileIsReplaced()
    {
        using var server = new LocalServer(CommittedT10k());
        using var tmp = new TempFolder();
        using var http = new HttpClient();
        File.WriteAllText(tmp.File("t10k-labels-idx1-ubyte.gz"), "half a download");
        File.Copy(TestFiles.T10kImages, tmp.File("t10k-images-idx3-ubyte.gz"));
        await DatasetDownloader.DownloadFilesAsync(T10k, tmp.Path, http, server.BaseUri, CancellationToken.None);
        Assert.Equal(["/mnist/t10k-labels-idx1-ubyte.gz"], server.Requests);
        Assert.Equal(File.ReadAllBytes(TestFiles.T10kLabels), File.ReadAllBytes(tmp.File("t10k-labels-idx1-ubyte.gz")));
    }

    [Fact]
    public async Task HttpErrorNamesTheUrlAndLeavesNothing()
    {
        using var server = new LocalServer(CommittedT10k()); // no train files: 404
        using var tmp = new TempFolder();
        using var http = new HttpClient();
        var e = await Assert.ThrowsAsync<IOException>(() => DatasetDownloader.DownloadAsync(DatasetKind.Mnist, tmp.Path, http, server.BaseUri));
        Assert.Contains(server.BaseUri + "train-images-idx3-ubyte.gz", e.Message, StringComparison.Ordinal);
        Assert.Contains("404", e.Message, StringComparison.Ordinal);
        Assert.Empty(Directory.GetFiles(tmp.Path));
    }

    [Fact]
    public async Task UnreachableHostSaysOfflineAndLeavesNothing()
    {
        var port = FreePort(); // closed again: connection refused
        var baseUri = new Uri($"http://127.0.0.1:{port}/mnist/");
        using var tmp = new TempFolder();
        var e = await Assert.ThrowsAsync<IOException>(() => DatasetDownloader.DownloadAsync(DatasetKind.FashionMnist, tmp.Path, baseUri: baseUri));
        Assert.Contains(baseUri + "train-images-idx3-ubyte.gz", e.Message, StringComparison.Ordinal);
        Assert.Contains("appears offline", e.Message, StringComparison.Ordinal);
        Assert.Empty(Directory.GetFiles(tmp.Path));
    }

    [Fact]
    public void FashionAndMnistListsHoldTheWellKnownSums()
    {
        Assert.Equal(4, DatasetDownloader.FilesOf(DatasetKind.FashionMnist).Count);
        Assert.Equal("8d4fb7e6c68d591d4c3dfef9ec88bf0d", DatasetDownloader.FilesOf(DatasetKind.FashionMnist)[0].ArchiveMd5);
        Assert.Equal("f68b3c2dcbeaaa9fbdd348bbdeb94873", DatasetDownloader.FilesOf(DatasetKind.Mnist)[0].ArchiveMd5);
        Assert.Throws<ArgumentException>(() => DatasetDownloader.FilesOf(DatasetKind.SwissRoll));
    }
}
