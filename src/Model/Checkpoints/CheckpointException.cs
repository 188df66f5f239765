namespace DistDiffusion.Model.Checkpoints;

/// <summary>A checkpoint could not be found or read; the message names the file and what is wrong.</summary>
/// <remarks>
/// Derives from <see cref="IOException"/> because <see cref="InvalidDataException"/> is sealed in .NET;
/// when the cause is a malformed safetensors file, <see cref="Exception.InnerException"/> is the
/// <see cref="InvalidDataException"/> raised by <see cref="SafeTensorsFile"/>.
/// </remarks>
public sealed class CheckpointException : IOException
{
    public CheckpointException() { }

    public CheckpointException(string message) : base(message) { }

    public CheckpointException(string message, Exception? innerException) : base(message, innerException) { }

    /// <summary>Creates an exception whose message reads "<paramref name="path"/>: <paramref name="problem"/>".</summary>
    public CheckpointException(string path, string problem, Exception? innerException)
        : base($"{path}: {problem}", innerException) => FilePath = path;

    /// <summary>The file or folder at fault, when known.</summary>
    public string? FilePath { get; }
}
