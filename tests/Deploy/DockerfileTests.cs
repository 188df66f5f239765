namespace DistDiffusion.Tests.Deploy;

/// <summary>deploy/docker/Dockerfile and .dockerignore checked offline (no Docker engine needed).</summary>
public sealed class DockerfileTests
{
    private static string Dockerfile => RepoFiles.Read(RepoFiles.Dockerfile);
    private static string DockerIgnoreText => RepoFiles.Read(RepoFiles.DockerIgnore);

    [Fact]
    public void The_Dockerfile_builds_both_variants_of_a_pinned_non_root_runtime_image()
    {
        var (facts, problems) = DockerfileChecks.FromRepo();
        ManifestTests.AssertNone(problems);
        Assert.Equal(DeployFacts.Current.TorchDevices.Order(), facts.Variants.Order());
        Assert.Contains("cuda", facts.Variants);
        Assert.NotNull(facts.Uid);
        Assert.Equal($"{facts.AppDir}/{DeployFacts.Current.CoordinatorExe}", facts.EntryPoint[0]);
    }

    [Fact]
    public void The_parser_reads_stages_continuations_and_arguments()
    {
        var m = DockerfileModel.Parse("# syntax=docker/dockerfile:1\nARG V=cpu\nFROM a:1.2.3 AS one\nRUN echo a \\\n  # a comment inside\n  && echo b\nFROM one-${V}\nCOPY --from=one --chown=1:1 /x /y\n");
        Assert.Equal("cpu", m.GlobalArgs["V"]);
        Assert.Equal(2, m.Stages.Count);
        Assert.Equal("echo a    && echo b", m.Stages[0].Instructions[0].Arguments);
        Assert.Equal("one-cpu", m.Stages[1].Base);
        Assert.Equal("one", m.Stages[1].Instructions[0].Flags["from"]);
        Assert.Equal(new[] { "/x", "/y" }, m.Stages[1].Instructions[0].Words);
    }

    /// <summary>Each check really fails: the repository's Dockerfile with one change each.</summary>
    [Theory]
    [InlineData("USER 1654:1654", "USER app", "not numeric")]
    [InlineData("USER 1654:1654", "USER 0", "USER 0 is root")]
    [InlineData("USER 1654:1654\n", "", "no USER")]
    [InlineData("aspnet:10.0.12-noble", "aspnet:latest", "not pinned to a full version tag")]
    [InlineData("sdk:10.0.401-noble", "sdk", "has no tag")]
    [InlineData("nvidia/cuda:12.8.1-runtime-ubuntu24.04", "nvidia/cuda:12.8.1-runtime-ubuntu22.04", "is not Ubuntu 24.04")]
    [InlineData("-p:TorchDevice=${TORCH_DEVICE} -o /app", "-o /app", "dotnet publish does not pass -p:TorchDevice")]
    [InlineData("restore src/Coordinator/DistDiffusion.Coordinator.csproj -p:TorchDevice=${TORCH_DEVICE}", "restore src/Coordinator/DistDiffusion.Coordinator.csproj", "dotnet restore does not pass -p:TorchDevice")]
    [InlineData("ARG TORCH_DEVICE=cpu", "ARG TORCH_DEVICE=cuda", "defaults to 'cuda'")]
    [InlineData("ARG TORCH_DEVICE\nWORKDIR /src", "WORKDIR /src", "does not declare ARG TORCH_DEVICE")]
    [InlineData("AS runtime-cuda", "AS runtime-gpu", "TORCH_DEVICE=cuda: FROM runtime-${TORCH_DEVICE} names no earlier stage")]
    [InlineData("EXPOSE 50051", "EXPOSE 8080", "does not EXPOSE the coordinator's port 50051")]
    [InlineData("ENTRYPOINT [\"/app/coordinator\"]", "ENTRYPOINT [\"/app/trainer\"]", "none of the executables")]
    [InlineData("ENTRYPOINT [\"/app/coordinator\"]", "ENTRYPOINT /app/coordinator", "no ENTRYPOINT in exec (JSON) form")]
    [InlineData("FROM runtime-${TORCH_DEVICE} AS runtime", "FROM build AS runtime", "built on the SDK image")]
    [InlineData("COPY src/Worker/DistDiffusion.Worker.csproj src/Worker/\n", "", "src/Worker/DistDiffusion.Worker.csproj is not copied before dotnet restore")]
    [InlineData("COPY protos/ protos/\n", "", "protos/ is not copied before dotnet publish")]
    [InlineData("mcr.microsoft.com/dotnet/aspnet:10.0.12-noble AS runtime-cpu", "mcr.microsoft.com/dotnet/runtime:10.0.12-noble AS runtime-cpu", "no ASP.NET Core shared framework")]
    [InlineData("COPY --from=build /app/ /app/", "COPY --from=build / /app/", "copies more than the publish folder")]
    public void A_broken_Dockerfile_is_reported(string oldText, string newText, string expected)
    {
        Assert.Contains(oldText, Dockerfile, StringComparison.Ordinal);
        var (_, problems) = DockerfileChecks.Check(Dockerfile.Replace(oldText, newText, StringComparison.Ordinal), DockerIgnoreText, DeployFacts.Current);
        Assert.True(problems.Any(p => p.Contains(expected, StringComparison.Ordinal)), $"no problem mentions '{expected}'; got:\n  " + string.Join("\n  ", problems));
    }

    [Theory]
    [InlineData("**/bin\n", "", "does not exclude src/Model/bin")]
    [InlineData(".git\n", "", "does not exclude .git")]
    [InlineData("runs\n", "", "does not exclude runs")]
    [InlineData("deploy\n", "deploy\nsrc/**/*.cs\n", "excludes src/")]
    [InlineData("deploy\n", "deploy\nprotos\n", "excludes protos")]
    public void A_broken_dockerignore_is_reported(string oldText, string newText, string expected)
    {
        Assert.Contains(oldText, DockerIgnoreText, StringComparison.Ordinal);
        var (_, problems) = DockerfileChecks.Check(Dockerfile, DockerIgnoreText.Replace(oldText, newText, StringComparison.Ordinal), DeployFacts.Current);
        Assert.True(problems.Any(p => p.Contains(expected, StringComparison.Ordinal)), $"no problem mentions '{expected}'; got:\n  " + string.Join("\n  ", problems));
    }
}
