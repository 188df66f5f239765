using System.Security.Cryptography.X509Certificates;

namespace DistDiffusion.Coordinator.Access;

/// <summary>
/// The server certificate from PEM files, read again when the certificate file changes: cert-manager renews a
/// certificate by rewriting its Secret, Kubernetes updates the mounted files, and new connections get the new
/// certificate without a restart. Checked at most every 30 s (<see cref="DefaultCheckInterval"/>); a file that cannot be read
/// (caught mid-update) keeps the previous certificate.
/// </summary>
public sealed class ReloadingCertificate(string certFile, string keyFile, ILogger log, TimeSpan? checkInterval = null)
{
    public static readonly TimeSpan DefaultCheckInterval = TimeSpan.FromSeconds(30);

    private readonly TimeSpan _interval = checkInterval ?? DefaultCheckInterval;

    private readonly Lock _lock = new();
    private X509Certificate2 _current = Load(certFile, keyFile);
    private DateTime _written = File.GetLastWriteTimeUtc(certFile);
    private DateTime _checked = DateTime.UtcNow;

    public X509Certificate2 Current
    {
        get
        {
            lock (_lock)
            {
                if (DateTime.UtcNow - _checked < _interval) return _current;
                _checked = DateTime.UtcNow;
                try
                {
                    var written = File.GetLastWriteTimeUtc(certFile);
                    if (written == _written) return _current;
                    _current = Load(certFile, keyFile);   // the old one may still be in use by a handshake: left to the GC
                    _written = written;
                    log.LogInformation("Reloaded the TLS certificate from {CertFile}: {Subject}, valid until {NotAfter:u}", certFile, _current.Subject, _current.NotAfter.ToUniversalTime());
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException or System.Security.Cryptography.CryptographicException or ArgumentException)
                {
                    log.LogWarning("Could not reload the TLS certificate from {CertFile}: {Error}; keeping the previous one", certFile, e.Message);
                }
                return _current;
            }
        }
    }

    private static X509Certificate2 Load(string certFile, string keyFile)
    {
        if (!File.Exists(certFile)) throw new ArgumentException($"--tls-cert {certFile}: no such file");
        if (!File.Exists(keyFile)) throw new ArgumentException($"--tls-key {keyFile}: no such file");
        try
        {
            return X509Certificate2.CreateFromPemFile(certFile, keyFile);
        }
        catch (System.Security.Cryptography.CryptographicException e)
        {
            throw new ArgumentException($"--tls-cert {certFile} / --tls-key {keyFile}: {e.Message}");
        }
    }
}
