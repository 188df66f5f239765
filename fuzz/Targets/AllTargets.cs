namespace DistDiffusion.Fuzz.Targets;

/// <summary>Every target by name (scripts/fuzz.sh, the replay command and tests/Fuzz use these names).</summary>
public static class AllTargets
{
    public static IReadOnlyList<string> Names { get; } =
        ["socket-coordinator", "socket-worker", "tensor", "step", "safetensors", "checkpoint-manifest", "idx", "png", "recipe"];

    /// <summary>A new instance of the target named <paramref name="name"/>.</summary>
    public static FuzzTarget Create(string name) => name switch
    {
        "socket-coordinator" => new SocketCoordinatorTarget(),
        "socket-worker" => new SocketWorkerTarget(),
        "tensor" => new TensorTarget(),
        "step" => new StepTarget(),
        "safetensors" => new SafeTensorsTarget(),
        "checkpoint-manifest" => new CheckpointManifestTarget(),
        "idx" => new IdxTarget(),
        "png" => new PngTarget(),
        "recipe" => new RecipeTarget(),
        _ => throw new ArgumentException($"unknown fuzz target '{name}'; expected one of: {string.Join(", ", Names)}"),
    };
}
