using Grpc.Core;

namespace DistDiffusion.Protocol;

/// <summary>
/// A message that breaks the protocol or carries unusable data: the status code the peer gets
/// (InvalidArgument, FailedPrecondition, ResourceExhausted, ...), a message naming the value and what was
/// expected, and the offending field.
/// </summary>
public sealed class ProtocolException(StatusCode code, string message, string field = "") : Exception(message)
{
    public StatusCode Code { get; } = code;
    public string Field { get; } = field;
}
