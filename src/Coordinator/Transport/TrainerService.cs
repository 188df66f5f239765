using System.Runtime.InteropServices;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Sampling;
using DistDiffusion.Coordinator.Training;
using DistDiffusion.Coordinator.Workers;
using DistDiffusion.Model.Optimization;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Google.Protobuf.WellKnownTypes;
using Google.Rpc;
using Grpc.Core;
using StatusCode = Grpc.Core.StatusCode;

namespace DistDiffusion.Coordinator.Transport;

/// <summary>
/// The worker-facing stream. Decodes and validates every message before anything reaches the training loop:
/// a bad message ends this worker's stream with a specific status (and a google.rpc.Status BadRequest detail
/// naming the field) and the training state never sees it; the worker's unfinished slices go to others.
/// </summary>
[BindServiceMethod(typeof(TrainerService), nameof(BindService))]
public sealed class TrainerService : Trainer.TrainerBase
{
    /// <summary>Largest message the coordinator accepts, on gRPC and the worker socket alike: a 1 MiB tensor chunk plus its framing fields.</summary>
    public const int MaxReceiveMessageBytes = TensorTransport.ChunkBytes + 64 * 1024;

    /// <summary>
    /// Registers Connect as the generated binding does, but with <see cref="TensorMessages"/>' marshallers: gradient
    /// chunks arrive in pooled arrays (same wire format). gRPC finds this through the attribute above, which takes
    /// precedence over the generated base class's. The parameter is the base type, as gRPC looks the handler up as an override of it.
    /// </summary>
    public static void BindService(ServiceBinderBase binder, Trainer.TrainerBase service) =>
        binder.AddMethod(TensorMessages.Connect, service is null ? null : new DuplexStreamingServerMethod<WorkerMessage, CoordinatorMessage>(service.Connect));

    private readonly TrainingLoop _loop;
    private readonly SamplingCoordinator _sampling;
    private readonly CoordinatorOptions _options;
    private readonly ILogger<TrainerService> _log;

    public TrainerService(TrainingLoop loop, SamplingCoordinator sampling, CoordinatorOptions options, ILogger<TrainerService> log)
    {
        _loop = loop;
        _sampling = sampling;
        _options = options;
        _log = log;
    }

    public override async Task Connect(IAsyncStreamReader<WorkerMessage> requestStream, IServerStreamWriter<CoordinatorMessage> responseStream, ServerCallContext context)
    {
        var timeout = TimeSpan.FromSeconds(_options.CallTimeoutSeconds);
        if (!await requestStream.MoveNext(context.CancellationToken).WaitAsync(timeout, context.CancellationToken))
            return;
        var first = requestStream.Current;
        if (first.KindCase != WorkerMessage.KindOneofCase.Join)
            throw Reject(StatusCode.InvalidArgument, $"first message is {first.KindCase}, expected Join", "kind", context.Peer);
        if (first.Join.ProtocolVersion != Names.ProtocolVersion)
            throw Reject(StatusCode.FailedPrecondition, $"protocol version {first.Join.ProtocolVersion}, this coordinator speaks {Names.ProtocolVersion}", "join.protocol_version", context.Peer);
        try
        {
            CheckJoin(first.Join);
        }
        catch (ProtocolException e)
        {
            throw Reject(e.Code, e.Message, e.Field, context.Peer);
        }

        var worker = new WorkerConnection(first.Join, context.Peer, context is TrainerSocketEndpoint.SocketCallContext);
        worker.Seen(first.CalculateSize());
        using var linked = CancellationTokenSource.CreateLinkedTokenSource(context.CancellationToken, worker.Aborted);
        var writer = WriteLoopAsync(worker, responseStream, timeout, linked, context.CancellationToken);
        worker.Inbox.OfferedSegment = OfferSharedMemory(first.Join, worker.Id);
        worker.Send(new CoordinatorMessage
        {
            Welcome = new Welcome
            {
                SharedMemory = worker.Inbox.OfferedSegment is { } offered
                    ? new SharedMemoryOffer { Path = offered.Path, Nonce = offered.Nonce, RegionBytes = (ulong)offered.RegionBytes }
                    : null,
                WorkerId = worker.Id,
                RecipeJson = _loop.Description.RecipeJson,
                TrainSize = _loop.Description.TrainSize,
                Parameters = { _loop.Description.ParameterInfos },
                HeartbeatIntervalMs = (uint)(_options.HeartbeatSeconds * 1000),
                GradientDtype = _loop.Description.GradientDtype,
                RunId = _loop.Description.RunId,
            },
        });
        _log.LogInformation("Worker {Worker} joined from {Peer} ({Transport}): host {Host}, device {Device}, {Threads} threads", worker.Id, context.Peer, worker.Socket ? "worker socket" : "gRPC stream", worker.Host, worker.Device, worker.Threads);
        _loop.Post(new WorkerJoined(worker));
        _sampling.AddWorker(worker);
        var reason = "stream closed";
        var departure = WorkerState.Dropped;
        try
        {
            while (await requestStream.MoveNext(linked.Token))
            {
                var message = requestStream.Current;
                try
                {
                    worker.Seen(message.CalculateSize());
                    if (Handle(worker, message) is { } left)
                    {
                        reason = left;
                        departure = WorkerState.Left;
                        break;
                    }
                }
                finally
                {
                    // A gradient chunk's bytes are in the tensor by now (or refused): its pooled array goes back.
                    TensorMessages.Release(message);
                }
            }
        }
        catch (ProtocolException e)
        {
            reason = e.Message;
            throw Reject(e.Code, e.Message, e.Field, worker.Id);
        }
        catch (OperationCanceledException) when (worker.AbortStatus is { } status)
        {
            reason = status.Detail;
            throw new RpcException(status);
        }
        catch (RpcException e) when (e.StatusCode is StatusCode.ResourceExhausted or StatusCode.InvalidArgument or StatusCode.Internal)
        {
            // gRPC itself refused a message (larger than the limit, or undecodable): tell the worker why.
            reason = e.Status.Detail;
            _log.LogWarning("Rejected {Who}: {Code} {Message}", worker.Id, e.StatusCode, e.Status.Detail);
            throw;
        }
        catch (Exception e) when (e is IOException or OperationCanceledException or RpcException)
        {
            reason = "connection lost: " + e.Message;
        }
        finally
        {
            // The name goes now; the mapping stays until the loop removes the worker (it may be writing parameters into it).
            worker.Inbox.OfferedSegment?.Dispose();
            worker.Inbox.OfferedSegment = null;
            worker.SharedMemory?.Unlink();
            _sampling.RemoveWorker(worker);
            _loop.Post(new WorkerGone(worker, departure, reason));
            worker.CloseOutbox();
            await writer.ConfigureAwait(false);
        }
    }

    /// <summary>
    /// The Join's strings end up in logs and in every status reply: each is bounded, and control characters (a newline
    /// would forge a log line) are refused, before anything is logged or stored.
    /// </summary>
    private static void CheckJoin(Join join)
    {
        WireText.CheckName(join.Host, "join.host", WireText.MaxHost);
        WireText.CheckName(join.Device, "join.device", WireText.MaxDevice);
        WireText.CheckName(join.BootId, "join.boot_id", WireText.MaxBootId);
        if (join.Threads is < 0 or > MaxThreads)
            throw new ProtocolException(StatusCode.InvalidArgument, $"join.threads {join.Threads}: expected 0..{MaxThreads}", "join.threads");
    }

    private const int MaxThreads = 1 << 16;

    /// <summary>Handles one message; returns a reason when the worker is leaving.</summary>
    private string? Handle(WorkerConnection worker, WorkerMessage message)
    {
        switch (message.KindCase)
        {
            case WorkerMessage.KindOneofCase.Join:
                throw new ProtocolException(StatusCode.FailedPrecondition, $"worker {worker.Id} sent a second Join on its stream", "join");
            case WorkerMessage.KindOneofCase.Heartbeat:
                CheckId(worker, message.Heartbeat.WorkerId);
                return null;
            case WorkerMessage.KindOneofCase.Leave:
                CheckId(worker, message.Leave.WorkerId);
                return "left: " + WireText.Escape(message.Leave.Reason);
            case WorkerMessage.KindOneofCase.Gradient:
                StartGradient(worker, message.Gradient);
                return null;
            case WorkerMessage.KindOneofCase.GradientChunk:
                AddChunk(worker, message.GradientChunk);
                return null;
            case WorkerMessage.KindOneofCase.SampleOutput:
                // A worker's error text is free-form (an exception message): escaped and cut before it is logged or passed on.
                if (message.SampleOutput.Error.Length > 0) message.SampleOutput.Error = WireText.Escape(message.SampleOutput.Error);
                _sampling.OnOutput(worker, message.SampleOutput);
                return null;
            case WorkerMessage.KindOneofCase.SampleOutputChunk:
                _sampling.OnOutputChunk(worker, message.SampleOutputChunk);
                return null;
            case WorkerMessage.KindOneofCase.SharedMemoryReply:
                AnswerOffer(worker, message.SharedMemoryReply);
                return null;
            default:
                throw new ProtocolException(StatusCode.InvalidArgument, $"message kind {message.KindCase} is not one a worker may send", "kind");
        }
    }

    /// <summary>A segment for a worker under this kernel, when enabled and possible (else null: the stream carries tensors).</summary>
    private SharedTensorSegment? OfferSharedMemory(Join join, string workerId)
    {
        if (!_options.SharedMemory || !join.SharedMemory || join.BootId.Length == 0 || join.BootId != SharedTensorSegment.BootId)
            return null;
        var segment = SharedTensorSegment.TryCreate(_loop.Description.ParameterElements * 4, out var reason);
        if (segment is null) _log.LogInformation("No shared memory for {Worker}: {Reason}", workerId, reason);
        return segment;
    }

    private void AnswerOffer(WorkerConnection worker, SharedMemoryReply reply)
    {
        if (worker.Inbox.OfferedSegment is not { } segment)
            throw new ProtocolException(StatusCode.FailedPrecondition, $"worker {worker.Id} answered a shared-memory offer it was not made (or answered twice)", "shared_memory_reply");
        worker.Inbox.OfferedSegment = null;
        segment.Unlink();   // both sides have it mapped; no name is left behind whatever happens next
        if (reply.Accepted)
        {
            worker.SharedMemory = segment;
            _log.LogInformation("Worker {Worker} exchanges tensors through shared memory", worker.Id);
        }
        else
        {
            segment.Dispose();
            _log.LogInformation("Worker {Worker} declined shared memory: {Reason}", worker.Id, WireText.Escape(reply.Reason, 200));
        }
    }

    private static void CheckId(WorkerConnection worker, string id)
    {
        if (id != worker.Id)
            throw new ProtocolException(StatusCode.InvalidArgument, $"unknown worker id '{WireText.Escape(id, WireText.MaxWorkerId)}': this stream belongs to {worker.Id}", "worker_id");
    }

    private void StartGradient(WorkerConnection worker, GradientHeader h)
    {
        StepTimeline.Mark(StepMark.Received, h.Step);
        CheckId(worker, h.WorkerId);
        if (worker.Inbox.Incoming is { } pending)
            throw new ProtocolException(StatusCode.InvalidArgument, $"gradient header for step {h.Step} slice {h.Slice} while slice {pending.Header.Slice} of step {pending.Header.Step} is incomplete", "gradient");
        worker.Inbox.Ignoring = null;
        var current = _loop.Current;
        var done = (ulong)_loop.StepsDone;
        if (current is null)
        {
            if (h.Step < done)
            {
                Ignore(worker, h, $"step {h.Step} is already done (the run is at step {done})");
                return;
            }
            throw new ProtocolException(StatusCode.FailedPrecondition, $"step {h.Step} is not in progress (the run is at step {done})", "step");
        }
        switch (current.Judge(h.Step, h.Slice, worker.Id))
        {
            case SliceRejection.OtherStep when h.Step < current.Step:
                Ignore(worker, h, $"step {h.Step} is already done (the run is at step {current.Step})");
                return;
            case SliceRejection.OtherStep:
                throw new ProtocolException(StatusCode.FailedPrecondition, $"step {h.Step} is not current: the run is at step {current.Step}", "step");
            case SliceRejection.NoSuchSlice:
                throw new ProtocolException(StatusCode.InvalidArgument, $"slice {h.Slice}: step {current.Step} has slices 0..{current.Holders.Length - 1}", "slice");
            case SliceRejection.Duplicate:
                Ignore(worker, h, $"slice {h.Slice} of step {h.Step} is already in");
                return;
            case SliceRejection.NotOwner:
                throw new ProtocolException(StatusCode.FailedPrecondition, $"slice {h.Slice} of step {h.Step} is not assigned to {worker.Id}", "slice");
        }
        if (h.ParameterVersion != current.Version)
            throw new ProtocolException(StatusCode.FailedPrecondition, $"parameter version {h.ParameterVersion} is not current: step {current.Step} uses version {current.Version}", "parameter_version");
        if (h.SampleCount != current.SliceSizes[h.Slice])
            throw new ProtocolException(StatusCode.InvalidArgument, $"sample_count {h.SampleCount}, slice {h.Slice} has {current.SliceSizes[h.Slice]} samples", "sample_count");
        if (!double.IsFinite(h.Loss))
            throw new ProtocolException(StatusCode.InvalidArgument, $"loss {h.Loss}: expected a finite number", "loss");
        var presentBytes = (_loop.Description.ParameterCount + 7) / 8;
        if (h.Present.Length != presentBytes)
            throw new ProtocolException(StatusCode.InvalidArgument, $"present bitmap has {h.Present.Length} bytes, expected {presentBytes} for {_loop.Description.ParameterCount} parameters", "present");
        if (h.Tensor is null)
            throw new ProtocolException(StatusCode.InvalidArgument, "gradient header without a tensor header", "tensor");
        if (h.Tensor.Step != h.Step || h.Tensor.ParameterVersion != h.ParameterVersion)
            throw new ProtocolException(StatusCode.InvalidArgument, $"tensor header says step {h.Tensor.Step} version {h.Tensor.ParameterVersion}, the gradient header step {h.Step} version {h.ParameterVersion}", "tensor.step");
        if (h.Tensor.Dtype != _loop.Description.GradientDtype)
            throw new ProtocolException(StatusCode.InvalidArgument, $"gradient dtype {h.Tensor.Dtype}: this run exchanges {_loop.Description.GradientDtype}", "tensor.dtype");
        var what = $"gradient of step {h.Step} slice {h.Slice}";
        if (h.Tensor.SharedMemory)
        {
            var copy = CopySharedGradient(worker, h.Tensor, what, out var sumOfSquares);
            Deliver(worker, h, copy, sumOfSquares);
            return;
        }
        worker.Inbox.Incoming = (h, new TensorAssembler(h.Tensor, _loop.Description.ParameterElements, what, _loop.GradientBuffers.Rent()));
    }

    /// <summary>
    /// A complete, verified gradient (its checksum on the stream, its write sequence in shared memory), handed to the loop with its sum of squares: the loop's
    /// <see cref="SliceGuard"/> judges its values (non-finite, out of bound) against the run's history, and decides
    /// between a broken worker (dropped, slice recomputed elsewhere) and a diverged run (two workers agree).
    /// </summary>
    /// <param name="sumOfSquares">The values' <see cref="VectorMath.SumOfSquares(ReadOnlySpan{float})"/> when already taken (with their copy).</param>
    private void Deliver(WorkerConnection worker, GradientHeader h, float[] values, double? sumOfSquares = null)
    {
        var gradient = new SliceGradient(worker, h.Step, h.Slice, values, h.Present.ToByteArray(), h.Loss, h.ComputeSeconds,
            sumOfSquares ?? VectorMath.SumOfSquares(values), h.Tensor.SharedMemory ? null : h.Tensor.Checksum);
        StepTimeline.Mark(StepMark.Delivered, h.Step);
        _loop.Post(new GradientArrived(gradient));
    }

    private void Ignore(WorkerConnection worker, GradientHeader h, string note)
    {
        _log.LogDebug("Ignoring push from {Worker}: {Note}", worker.Id, note);
        // The loop compares its checksum with the result it took (same slice, same bits, or a worker computes wrong).
        _loop.Post(new DuplicateSeen(worker, h.Step, h.Slice, ChecksumOf(worker, h)));
        worker.Inbox.Ignoring = (h.Step, h.Slice);
        worker.Send(new CoordinatorMessage { Ack = new Ack { Step = h.Step, Slice = h.Slice, Applied = false, Note = note } });
    }

    /// <summary>
    /// The checksum of an ignored push, to compare with the result that was taken: the header's, or for a payload in
    /// shared memory (whose header has none) the hash of a copy, checked like any shared payload. Null without a tensor.
    /// </summary>
    private ulong? ChecksumOf(WorkerConnection worker, GradientHeader h)
    {
        if (h.Tensor is not { SharedMemory: true } tensor) return h.Tensor?.Checksum;
        var copy = CopySharedGradient(worker, tensor, $"gradient of step {h.Step} slice {h.Slice}", out _);
        try
        {
            return TensorTransport.Checksum(copy);
        }
        finally
        {
            _loop.GradientBuffers.Return(copy);
        }
    }

    /// <summary>
    /// A gradient in the worker's shared region, copied into a pooled buffer and checked to be the write its header
    /// describes (the worker may write its region again at any time), with its sum of squares for the slice guard
    /// (float32: taken in the copy's own pass). A refused copy's buffer goes back to the pool.
    /// </summary>
    private float[] CopySharedGradient(WorkerConnection worker, TensorHeader tensor, string what, out double sumOfSquares)
    {
        if (worker.SharedMemory is not { } segment)
            throw new ProtocolException(StatusCode.FailedPrecondition, $"{what}: announced in shared memory, but this worker has no segment", "tensor.shared_memory");
        var buffer = _loop.GradientBuffers.Rent();
        try
        {
            if (tensor.Dtype != DType.Float32)
            {
                var decoded = TensorAssembler.CopyShared(tensor, _loop.Description.ParameterElements, what, segment, SharedRegion.Gradients, buffer);
                sumOfSquares = VectorMath.SumOfSquares(decoded);
                return decoded;
            }
            var payload = TensorAssembler.CheckShared(tensor, _loop.Description.ParameterElements, what, segment, SharedRegion.Gradients);
            sumOfSquares = VectorMath.CopyWithSumOfSquares(MemoryMarshal.Cast<byte, float>(payload), buffer);
            segment.ExpectSequence(SharedRegion.Gradients, tensor.SharedSequence, what, after: true);   // the copy is exactly that write
            return buffer;
        }
        catch
        {
            _loop.GradientBuffers.Return(buffer);
            throw;
        }
    }

    private void AddChunk(WorkerConnection worker, GradientChunk c)
    {
        CheckId(worker, c.WorkerId);
        if (c.Chunk is null)
            throw new ProtocolException(StatusCode.InvalidArgument, "gradient chunk without data", "chunk");
        if (worker.Inbox.Ignoring is { } ignoring && ignoring.Step == c.Chunk.Step && ignoring.Slice == c.Slice)
            return;
        if (worker.Inbox.Incoming is not { } incoming)
            throw new ProtocolException(StatusCode.FailedPrecondition, $"gradient chunk {c.Chunk.Index} for step {c.Chunk.Step} slice {c.Slice} without a gradient header", "chunk");
        if (c.Slice != incoming.Header.Slice)
            throw new ProtocolException(StatusCode.InvalidArgument, $"chunk for slice {c.Slice} while receiving slice {incoming.Header.Slice}", "slice");
        incoming.Assembler.Add(c.Chunk);
        if (!incoming.Assembler.IsComplete) return;
        worker.Inbox.Incoming = null;
        Deliver(worker, incoming.Header, incoming.Assembler.ToFloat32());
    }

    private static async Task WriteLoopAsync(WorkerConnection worker, IServerStreamWriter<CoordinatorMessage> stream, TimeSpan timeout, CancellationTokenSource linked, CancellationToken callEnded)
    {
        try
        {
            // Waiting for the next message ends on abort; a write in progress does not (cancelling a response write resets
            // the HTTP/2 stream, and the worker would see Cancelled instead of the status saying why it was dropped).
            await foreach (var message in worker.Outbox.ReadAllAsync(linked.Token))
                await stream.WriteAsync(message, callEnded).WaitAsync(timeout, callEnded);
        }
        catch (Exception e) when (e is OperationCanceledException or IOException or InvalidOperationException or TimeoutException)
        {
            // The stream is gone or the worker stopped reading: end the call so the loop hands its work on.
            if (e is TimeoutException) worker.Abort(StatusCode.DeadlineExceeded, $"worker did not read for {timeout.TotalSeconds:F0} s");
            await linked.CancelAsync();
        }
    }

    private RpcException Reject(StatusCode code, string message, string field, string who)
    {
        _log.LogWarning("Rejected {Who}: {Code} {Message}", who, code, message);
        var status = new Google.Rpc.Status
        {
            Code = (int)code,
            Message = message,
            Details =
            {
                Any.Pack(new BadRequest { FieldViolations = { new BadRequest.Types.FieldViolation { Field = field, Description = message } } }),
            },
        };
        return status.ToRpcException();
    }
}
