using System.Net;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Coordinator.Server;
using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;
using Grpc.Core;

namespace DistDiffusion.Tests.Distributed;

[Collection(ClusterCollection.Name)]
public sealed class TlsAndConfigurationTests() : TempFolderTest("dd-tls")
{

    /// <summary>A self-signed certificate for 127.0.0.1 written as PEM (certificate, key).</summary>
    private (string Cert, string Key) SelfSigned()
    {
        using var key = RSA.Create(2048);
        var request = new CertificateRequest("CN=distdiffusion-test", key, HashAlgorithmName.SHA256, RSASignaturePadding.Pkcs1);
        var san = new SubjectAlternativeNameBuilder();
        san.AddIpAddress(IPAddress.Loopback);
        san.AddDnsName("localhost");
        request.CertificateExtensions.Add(san.Build());
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, false, 0, true));
        using var cert = request.CreateSelfSigned(DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddDays(1));
        var certPath = Path.Combine(Dir, "tls.crt");
        var keyPath = Path.Combine(Dir, "tls.key");
        File.WriteAllText(certPath, cert.ExportCertificatePem());
        File.WriteAllText(keyPath, key.ExportPkcs8PrivateKeyPem());
        return (certPath, keyPath);
    }

    [Fact(Timeout = 120_000)]
    public async Task WithACertificateTheCoordinatorSpeaksTlsAndAWorkerTrustingItsCaTrains()
    {
        var (cert, key) = SelfSigned();
        var options = Cluster.Options(Path.Combine(Dir, "run"), steps: 3);
        options.Listen = "https://127.0.0.1:0";
        options.TlsCert = cert;
        options.TlsKey = key;
        await using var server = await Cluster.Start(options);
        Assert.Equal("https", server.Address.Scheme);

        using (var trusted = ClientChannel.Create(server.Address, cert))
        {
            var reply = await new DistDiffusion.Protocol.V1.Coordinator.CoordinatorClient(trusted).GetStatusAsync(new GetStatusRequest(), Token.Headers(Cluster.Token));
            Assert.Equal("swissroll", reply.Recipe);
        }
        using (var untrusted = ClientChannel.Create(server.Address))
        {
            var e = await Assert.ThrowsAsync<RpcException>(async () =>
                await new DistDiffusion.Protocol.V1.Coordinator.CoordinatorClient(untrusted).GetStatusAsync(new GetStatusRequest(), Token.Headers(Cluster.Token)));
            // The TLS handshake fails: grpc-dotnet reports it as Internal (SSL) or Unavailable.
            Assert.Contains(e.StatusCode, new[] { StatusCode.Unavailable, StatusCode.Internal });
            Assert.Contains("SSL", e.Status.DebugException?.ToString() ?? e.Status.Detail, StringComparison.OrdinalIgnoreCase);
        }
        using var worker = new WorkerProcess(server.Address, Cluster.Token, 1, "--tls-ca", cert);
        await server.Loop.Completion.WaitAsync(TimeSpan.FromSeconds(90));
        Assert.Equal(3, server.Loop.StepsDone);
    }

    [Fact]
    public void SettingsComeFromEnvironmentThenFlagsAndUnknownKeysAreRefused()
    {
        var key = Names.EnvironmentPrefix + "Coordinator__StepDeadlineSeconds";
        var other = Names.EnvironmentPrefix + "Coordinator__HeartbeatSeconds";
        Environment.SetEnvironmentVariable(key, "42");
        Environment.SetEnvironmentVariable(other, "2.5");
        try
        {
            var fromEnv = ServeCommand.Configure(new Dictionary<string, string?>());
            Assert.Equal(42, fromEnv.StepDeadlineSeconds);
            Assert.Equal(2.5, fromEnv.HeartbeatSeconds);
            var flagWins = ServeCommand.Configure(new Dictionary<string, string?> { ["Coordinator:StepDeadlineSeconds"] = "7" });
            Assert.Equal(7, flagWins.StepDeadlineSeconds);
            Assert.Equal(2.5, flagWins.HeartbeatSeconds);
            var e = Assert.Throws<UsageException>(() => ServeCommand.Configure(new Dictionary<string, string?> { ["Coordinator:StepDeadlinSeconds"] = "7" }));
            Assert.Contains("StepDeadlinSeconds", e.Message, StringComparison.Ordinal);
        }
        finally
        {
            Environment.SetEnvironmentVariable(key, null);
            Environment.SetEnvironmentVariable(other, null);
        }
    }
}
