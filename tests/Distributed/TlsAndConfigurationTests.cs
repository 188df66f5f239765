using System.Net;
using System.Security.Cryptography.X509Certificates;
using System.Security.Cryptography;
using DistDiffusion.Coordinator.Access;
using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Grpc.Core;
using Grpc.Health.V1;

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
            var reply = await new Coordination.CoordinationClient(trusted).GetStatusAsync(new GetStatusRequest(), Token.Headers(Cluster.Token));
            Assert.Equal("swissroll", reply.Recipe);
        }
        using (var untrusted = ClientChannel.Create(server.Address))
        {
            var e = await Assert.ThrowsAsync<RpcException>(async () =>
                await new Coordination.CoordinationClient(untrusted).GetStatusAsync(new GetStatusRequest(), Token.Headers(Cluster.Token)));
            // The TLS handshake fails: grpc-dotnet reports it as Internal (SSL) or Unavailable.
            Assert.Contains(e.StatusCode, new[] { StatusCode.Unavailable, StatusCode.Internal });
            Assert.Contains("SSL", e.Status.DebugException?.ToString() ?? e.Status.Detail, StringComparison.OrdinalIgnoreCase);
        }
        // The worker socket speaks the same TLS on the same port: refused without the CA, admitted with it.
        var tlsRefused = await Assert.ThrowsAsync<RpcException>(() => SocketTrainerCall.ConnectAsync(server.Address, null, Token.Headers(Cluster.Token), TimeSpan.FromSeconds(30), CancellationToken.None));
        Assert.Equal(StatusCode.Unavailable, tlsRefused.StatusCode);
        using (var call = await SocketTrainerCall.ConnectAsync(server.Address, cert, Token.Headers(Cluster.Token), TimeSpan.FromSeconds(30), CancellationToken.None))
            Assert.Equal(SocketCallState.Streaming, call.State);
        using var worker = new WorkerProcess(server.Address, Cluster.Token, 1, "--tls-ca", cert);
        await server.Loop.Completion.WaitAsync(TimeSpan.FromSeconds(90));
        Assert.Equal(3, server.Loop.StepsDone);
        await Cluster.WaitUntil(() => worker.Process.HasExited, TimeSpan.FromSeconds(30), "the worker to exit");
        Assert.Contains("(worker socket)", worker.Output, StringComparison.Ordinal);
        Assert.DoesNotContain("using the gRPC stream", worker.Output, StringComparison.Ordinal);
    }

    /// <summary>
    /// A private CA and a server certificate it signed for <paramref name="names"/> (and 127.0.0.1), written as a
    /// kubernetes.io/tls Secret mounts them: tls.crt, tls.key and ca.crt (cert-manager's layout). Returns the folder.
    /// </summary>
    private string IssuedByCa(string folder, params string[] names)
    {
        var dir = Path.Combine(Dir, folder);
        Directory.CreateDirectory(dir);
        using var caKey = RSA.Create(2048);
        var caRequest = new CertificateRequest("CN=distdiffusion-test-ca", caKey, HashAlgorithmName.SHA256, RSASignaturePadding.Pkcs1);
        caRequest.CertificateExtensions.Add(new X509BasicConstraintsExtension(true, false, 0, true));
        caRequest.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.KeyCertSign | X509KeyUsageFlags.CrlSign, true));
        using var ca = caRequest.CreateSelfSigned(DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddDays(30));
        using var key = RSA.Create(2048);
        var request = new CertificateRequest("CN=distdiffusion-coordinator", key, HashAlgorithmName.SHA256, RSASignaturePadding.Pkcs1);
        var san = new SubjectAlternativeNameBuilder();
        foreach (var name in names)
        {
            if (IPAddress.TryParse(name, out var ip)) san.AddIpAddress(ip);
            else san.AddDnsName(name);
        }
        request.CertificateExtensions.Add(san.Build());
        request.CertificateExtensions.Add(new X509BasicConstraintsExtension(false, false, 0, true));
        request.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension([new Oid("1.3.6.1.5.5.7.3.1")], false));
        using var leaf = request.Create(ca, DateTimeOffset.UtcNow.AddDays(-1), DateTimeOffset.UtcNow.AddDays(7), RandomNumberGenerator.GetBytes(16));
        File.WriteAllText(Path.Combine(dir, "tls.crt"), leaf.ExportCertificatePem());
        File.WriteAllText(Path.Combine(dir, "tls.key"), key.ExportPkcs8PrivateKeyPem());
        File.WriteAllText(Path.Combine(dir, "ca.crt"), ca.ExportCertificatePem());
        return dir;
    }

    [Fact(Timeout = 120_000)]
    public async Task WithTheManifestsTlsLayoutWorkersVerifyTheCaAndProbesGetACleartextHealthPortThatServesNothingElse()
    {
        var tls = IssuedByCa("tls", "distdiffusion-coordinator", "localhost", "127.0.0.1");
        var options = Cluster.Options(Path.Combine(Dir, "run"), steps: 3);
        options.Listen = "https://127.0.0.1:0";
        options.TlsCert = Path.Combine(tls, "tls.crt");
        options.TlsKey = Path.Combine(tls, "tls.key");
        options.HealthListen = "http://127.0.0.1:0";
        options.Http = "https://127.0.0.1:0";
        await using var server = await Cluster.Start(options, new ServerCredentials(null, Cluster.WorkerToken, Cluster.ClientToken));
        var ca = Path.Combine(tls, "ca.crt");

        // The metrics port (the manifest's --http https://...): TLS with the same certificate, verified against the CA.
        Assert.NotNull(server.HttpAddress);
        Assert.Equal(Uri.UriSchemeHttps, server.HttpAddress.Scheme);
        using (var trust = X509Certificate2.CreateFromPem(File.ReadAllText(ca)))
        using (var handler = new HttpClientHandler
        {
            ServerCertificateCustomValidationCallback = (_, certificate, _, _) =>
            {
                using var chain = new X509Chain();
                chain.ChainPolicy.TrustMode = X509ChainTrustMode.CustomRootTrust;
                chain.ChainPolicy.CustomTrustStore.Add(trust);
                chain.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
                return certificate is not null && chain.Build(certificate);
            },
        })
        using (var https = new HttpClient(handler) { Timeout = TimeSpan.FromSeconds(30) })
        {
            using var request = new HttpRequestMessage(HttpMethod.Get, new Uri(server.HttpAddress, "/metrics"));
            request.Headers.Authorization = new System.Net.Http.Headers.AuthenticationHeaderValue("Bearer", Cluster.ClientToken);
            using var response = await https.SendAsync(request);
            Assert.Equal(HttpStatusCode.OK, response.StatusCode);
            Assert.Contains("distdiffusion_steps_total", await response.Content.ReadAsStringAsync(), StringComparison.Ordinal);
        }

        // The probe's port: cleartext, the health Check only, without a token.
        Assert.NotNull(server.HealthAddress);
        Assert.NotEqual(server.Address.Port, server.HealthAddress.Port);
        using (var probe = ClientChannel.Create(server.HealthAddress))
        {
            var health = new Health.HealthClient(probe);
            Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, (await health.CheckAsync(new HealthCheckRequest())).Status);
            var status = await Assert.ThrowsAsync<RpcException>(async () =>
                await new Coordination.CoordinationClient(probe).GetStatusAsync(new GetStatusRequest(), Token.Headers(Cluster.ClientToken)));
            Assert.Equal(StatusCode.PermissionDenied, status.StatusCode);
            Assert.Contains("the health port serves /grpc.health.v1.Health/Check only", status.Status.Detail, StringComparison.Ordinal);
            using var watch = health.Watch(new HealthCheckRequest(), Token.Headers(Cluster.ClientToken));
            Assert.Equal(StatusCode.PermissionDenied, (await Assert.ThrowsAsync<RpcException>(() => watch.ResponseStream.MoveNext(CancellationToken.None))).StatusCode);
        }
        // The main port speaks TLS only.
        using (var cleartext = ClientChannel.Create(new UriBuilder(server.Address) { Scheme = "http" }.Uri))
            await Assert.ThrowsAsync<RpcException>(async () => await new Health.HealthClient(cleartext).CheckAsync(new HealthCheckRequest(), deadline: DateTime.UtcNow.AddSeconds(10)));
        // A certificate from the same CA for another name is refused: the CA alone does not make a server trusted.
        var other = IssuedByCa("other", "someone-else.example");
        var otherCa = Path.Combine(other, "ca.crt");
        var impostorOptions = Cluster.Options(Path.Combine(Dir, "impostor"), steps: 3);
        impostorOptions.Listen = "https://127.0.0.1:0";
        impostorOptions.TlsCert = Path.Combine(other, "tls.crt");
        impostorOptions.TlsKey = Path.Combine(other, "tls.key");
        await using (var impostor = await Cluster.Start(impostorOptions, new ServerCredentials(null, Cluster.WorkerToken, Cluster.ClientToken)))
        using (var channel = ClientChannel.Create(impostor.Address, otherCa))
        {
            var e = await Assert.ThrowsAsync<RpcException>(async () =>
                await new Coordination.CoordinationClient(channel).GetStatusAsync(new GetStatusRequest(), Token.Headers(Cluster.ClientToken)));
            Assert.Contains(e.StatusCode, new[] { StatusCode.Unavailable, StatusCode.Internal });
        }
        // `coordinator status` verifies with --tls-ca, and a worker process trusting the CA trains.
        var tokenFile = Path.Combine(Dir, "client-token");
        Token.WriteFile(tokenFile, Cluster.ClientToken);
        var (code, output, err) = CliHarness.Run("status", "--address", server.Address.ToString(), "--token-file", tokenFile, "--tls-ca", ca);
        Assert.True(code == 0, err);
        Assert.Contains("recipe swissroll", output, StringComparison.Ordinal);
        using var worker = new WorkerProcess(server.Address, null, 1, new Dictionary<string, string> { [Names.WorkerTokenEnvironmentVariable] = Cluster.WorkerToken }, "--tls-ca", ca);
        await Cluster.WaitUntil(() => server.Loop.Completion.IsCompleted, TimeSpan.FromSeconds(90), "training over TLS", () => worker.Output);
        Assert.Equal(3, server.Loop.StepsDone);
    }

    [Fact]
    public void ARenewedCertificateIsPickedUpWithoutARestartAndAHalfWrittenOneIsNot()
    {
        var first = IssuedByCa("first", "127.0.0.1");
        var cert = Path.Combine(first, "tls.crt");
        var key = Path.Combine(first, "tls.key");
        var reloading = new ReloadingCertificate(cert, key, Microsoft.Extensions.Logging.Abstractions.NullLogger.Instance, TimeSpan.Zero);
        var before = reloading.Current.Thumbprint;
        Assert.Equal(before, reloading.Current.Thumbprint);

        // A renewal, as Kubernetes updates a mounted Secret: both files replaced.
        var second = IssuedByCa("second", "127.0.0.1");
        File.Copy(Path.Combine(second, "tls.crt"), cert, overwrite: true);
        File.Copy(Path.Combine(second, "tls.key"), key, overwrite: true);
        File.SetLastWriteTimeUtc(cert, DateTime.UtcNow.AddSeconds(5));
        var renewed = reloading.Current.Thumbprint;
        Assert.NotEqual(before, renewed);
        using (var expected = X509Certificate2.CreateFromPemFile(cert, key))
            Assert.Equal(expected.Thumbprint, renewed);

        // A certificate whose key has not arrived yet: the previous pair stays in use.
        var third = IssuedByCa("third", "127.0.0.1");
        File.Copy(Path.Combine(third, "tls.crt"), cert, overwrite: true);
        File.SetLastWriteTimeUtc(cert, DateTime.UtcNow.AddSeconds(10));
        Assert.Equal(renewed, reloading.Current.Thumbprint);
    }

    [Fact]
    public void RoleTokensComeFromTheirFilesOrVariablesAndMustDiffer()
    {
        var worker = Path.Combine(Dir, "worker-token");
        var client = Path.Combine(Dir, "client-token");
        Token.WriteFile(worker, "w-secret");
        Token.WriteFile(client, "c-secret");
        var options = new CoordinatorOptions { WorkerTokenFile = worker, ClientTokenFile = client };
        var credentials = ServerCredentials.Resolve(options, _ => null);
        Assert.Equal(new ServerCredentials(null, "w-secret", "c-secret"), credentials);
        Assert.Equal(Roles.Worker, credentials.RolesOf("Bearer w-secret"));
        Assert.Equal(Roles.Client, credentials.RolesOf("Bearer c-secret"));
        Assert.Equal(Roles.None, credentials.RolesOf("Bearer shared"));
        Assert.Equal(Roles.None, credentials.RolesOf(null));

        var env = new Dictionary<string, string>
        {
            [Names.TokenEnvironmentVariable] = "shared",
            [Names.WorkerTokenEnvironmentVariable] = "w-env",
            [Names.ClientTokenEnvironmentVariable] = "c-env",
        };
        var fromEnv = ServerCredentials.Resolve(new CoordinatorOptions(), env.GetValueOrDefault);
        Assert.Equal(new ServerCredentials("shared", "w-env", "c-env"), fromEnv);
        Assert.Equal(Roles.Any, fromEnv.RolesOf("Bearer shared"));
        // What each side presents: a worker its worker token, a client its client token, either falling back to the shared one.
        Assert.Equal("w-env", Token.ResolveWorker(null, env.GetValueOrDefault));
        Assert.Equal("c-env", Token.ResolveClient(null, env.GetValueOrDefault));
        Assert.Equal("shared", Token.ResolveWorker(null, k => k == Names.TokenEnvironmentVariable ? "shared" : null));

        Token.WriteFile(client, "w-secret");
        var (code, _, err) = CliHarness.Run("serve", "--recipe", "swissroll", "--out", Path.Combine(Dir, "x"), "--listen", "http://127.0.0.1:0",
            "--worker-token-file", worker, "--client-token-file", client);
        Assert.Equal(2, code);
        Assert.Contains("the worker token and the client token are the same", err, StringComparison.Ordinal);
        (code, _, err) = CliHarness.Run("serve", "--recipe", "swissroll", "--out", Path.Combine(Dir, "x"), "--listen", "https://127.0.0.1:0",
            "--worker-token-file", worker, "--health-listen", "https://127.0.0.1:0");
        Assert.Equal(2, code);
        Assert.Contains("--listen https://127.0.0.1:0: https needs --tls-cert and --tls-key", err, StringComparison.Ordinal);
        (code, _, err) = CliHarness.Run("serve", "--recipe", "swissroll", "--out", Path.Combine(Dir, "x"), "--listen", "http://127.0.0.1:50070",
            "--worker-token-file", worker, "--health-listen", "https://127.0.0.1:50071");
        Assert.Equal(2, code);
        Assert.Contains("the health port is cleartext", err, StringComparison.Ordinal);
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
