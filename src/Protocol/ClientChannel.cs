using System.Net.Security;
using System.Net.Sockets;
using System.Security.Cryptography.X509Certificates;
using Grpc.Net.Client;

namespace DistDiffusion.Protocol;

/// <summary>How clients (workers, `coordinator status`/`sample`, tests) open a channel to the coordinator.</summary>
public static class ClientChannel
{
    /// <summary>Largest message a client accepts: a 1 MiB chunk plus framing, with room for status replies.</summary>
    public const int MaxReceiveMessageBytes = 4 << 20;

    /// <summary>
    /// A channel to <paramref name="address"/> (http:// or https://). With <paramref name="caFile"/>, an https
    /// server certificate must chain to one of that file's CA certificates (a private cluster CA, e.g. cert-manager's
    /// ca.crt) and name the host dialled; otherwise the system's trust store decides.
    /// </summary>
    public static GrpcChannel Create(Uri address, string? caFile = null)
    {
        if (address.Scheme != Uri.UriSchemeHttp && address.Scheme != Uri.UriSchemeHttps)
            throw new ArgumentException($"address {address}: expected an http:// or https:// URL");
        var handler = new SocketsHttpHandler
        {
            // Detect a dead peer on an idle stream; the server permits pings this frequent.
            KeepAlivePingDelay = TimeSpan.FromSeconds(20),
            KeepAlivePingTimeout = TimeSpan.FromSeconds(20),
            KeepAlivePingPolicy = HttpKeepAlivePingPolicy.WithActiveRequests,
            ConnectTimeout = TimeSpan.FromSeconds(10),
            EnableMultipleHttp2Connections = true,
            // Megabytes of parameters arrive per step: do not let a 64 KiB window make them wait for round trips.
            InitialHttp2StreamWindowSize = 16 << 20,
            // The HTTP/2 client reads one 16 KiB frame per socket call, each after a zero-byte wait of its own: a tensor
            // chunk took ~130 receive calls per MiB. Read-ahead makes that a handful (benchmark-exchange, issue 9).
            ConnectCallback = ConnectAsync,
        };
        if (caFile is not null)
            handler.SslOptions = new SslClientAuthenticationOptions { RemoteCertificateValidationCallback = CertificateValidator(caFile) };
        return GrpcChannel.ForAddress(address, new GrpcChannelOptions
        {
            HttpHandler = handler,
            MaxReceiveMessageSize = MaxReceiveMessageBytes,
            MaxSendMessageSize = MaxReceiveMessageBytes,
        });
    }

    /// <summary>
    /// With a private CA file: the server certificate must chain to one of its certificates and name the host dialled
    /// (null without one: the system's trust store decides). Used by the gRPC channel and the worker socket alike.
    /// </summary>
    public static RemoteCertificateValidationCallback? CertificateValidator(string? caFile)
    {
        if (caFile is null) return null;
        var cas = LoadCertificates(caFile);
        return (_, cert, presented, errors) =>
        {
            if (cert is null) return false;
            if (errors == SslPolicyErrors.None) return true;
            // The certificate must name the host dialled, whoever signed it.
            if ((errors & (SslPolicyErrors.RemoteCertificateNameMismatch | SslPolicyErrors.RemoteCertificateNotAvailable)) != 0) return false;
            using var chain = new X509Chain();
            chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
            chain.ChainPolicy.CustomTrustStore.AddRange(cas);
            chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
            // Intermediates the server sent with its certificate (a tls.crt holding the chain).
            if (presented is not null)
                foreach (var element in presented.ChainElements)
                    chain.ChainPolicy.ExtraStore.Add(element.Certificate);
            chain.ChainPolicy.ApplicationPolicy.Add(new System.Security.Cryptography.Oid("1.3.6.1.5.5.7.3.1"));   // TLS server authentication
            using var leaf = X509CertificateLoader.LoadCertificate(cert.GetRawCertData());
            return chain.Build(leaf);
        };
    }

    /// <summary>Bytes a connection receives per socket call at most (its read-ahead buffer).</summary>
    public const int ReadAheadBytes = 256 << 10;

    /// <summary>What SocketsHttpHandler does by default (dual-mode socket, Nagle off), with the stream reading ahead.</summary>
    private static async ValueTask<Stream> ConnectAsync(SocketsHttpConnectionContext context, CancellationToken ct)
    {
        Socket? socket = new(SocketType.Stream, ProtocolType.Tcp);
        try
        {
            socket.NoDelay = true;
            await socket.ConnectAsync(context.DnsEndPoint, ct).ConfigureAwait(false);
            var stream = new ReadAheadStream(new NetworkStream(socket, ownsSocket: true), ReadAheadBytes);
            socket = null;   // the stream owns it now
            return stream;
        }
        finally
        {
            socket?.Dispose();
        }
    }

    /// <summary>Every certificate in a PEM file (a CA bundle may hold several), naming --tls-ca on error.</summary>
    public static X509Certificate2Collection LoadCertificates(string caFile)
    {
        if (!File.Exists(caFile)) throw new ArgumentException($"--tls-ca {caFile}: no such file");
        var cas = new X509Certificate2Collection();
        try
        {
            cas.ImportFromPemFile(caFile);
        }
        catch (System.Security.Cryptography.CryptographicException e)
        {
            throw new ArgumentException($"--tls-ca {caFile}: {e.Message}");
        }
        if (cas.Count == 0) throw new ArgumentException($"--tls-ca {caFile}: no PEM certificate in the file (expected e.g. the ca.crt of the coordinator's certificate)");
        return cas;
    }

    /// <summary>Parses a user-given address, naming the flag on error.</summary>
    public static Uri ParseAddress(string text, string flag)
    {
        if (!Uri.TryCreate(text, UriKind.Absolute, out var uri) || (uri.Scheme != Uri.UriSchemeHttp && uri.Scheme != Uri.UriSchemeHttps))
            throw new ArgumentException($"{flag} {text}: expected a URL such as {Names.DefaultAddress}");
        return uri;
    }
}
