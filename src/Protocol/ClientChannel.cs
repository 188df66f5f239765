using System.Net.Security;
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
    /// server certificate must chain to that CA (a private cluster CA); otherwise the system's trust store decides.
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
        };
        if (caFile is not null)
        {
            if (!File.Exists(caFile)) throw new ArgumentException($"--tls-ca {caFile}: no such file");
            var ca = X509CertificateLoader.LoadCertificateFromFile(caFile);
            handler.SslOptions = new SslClientAuthenticationOptions
            {
                RemoteCertificateValidationCallback = (_, cert, _, errors) =>
                {
                    if (cert is null) return false;
                    if (errors == SslPolicyErrors.None) return true;
                    if ((errors & SslPolicyErrors.RemoteCertificateNameMismatch) != 0) return false;
                    using var chain = new X509Chain();
                    chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
                    chain.ChainPolicy.CustomTrustStore.Add(ca);
                    chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
                    return chain.Build(new X509Certificate2(cert));
                },
            };
        }
        return GrpcChannel.ForAddress(address, new GrpcChannelOptions
        {
            HttpHandler = handler,
            MaxReceiveMessageSize = MaxReceiveMessageBytes,
            MaxSendMessageSize = MaxReceiveMessageBytes,
        });
    }

    /// <summary>Parses a user-given address, naming the flag on error.</summary>
    public static Uri ParseAddress(string text, string flag)
    {
        if (!Uri.TryCreate(text, UriKind.Absolute, out var uri) || (uri.Scheme != Uri.UriSchemeHttp && uri.Scheme != Uri.UriSchemeHttps))
            throw new ArgumentException($"{flag} {text}: expected a URL such as {Names.DefaultAddress}");
        return uri;
    }
}
