using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Threading.Channels;
using DistDiffusion.Model;
using DistDiffusion.Model.Training;
using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;
using Grpc.Core;
using Microsoft.Extensions.Logging;
using static TorchSharp.torch;

namespace DistDiffusion.Worker;

/// <summary>How a connection ended.</summary>
internal enum SessionOutcome
{
    /// <summary>The coordinator said the work is done: exit.</summary>
    Finished,
    /// <summary>The stream ended or the coordinator is restarting: connect again.</summary>
    Reconnect,
}

/// <summary>Where a worker's stream is in the protocol.</summary>
internal enum SessionState
{
    Connecting,
    Joining,
    Ready,
    Computing,
    Closed,
}

/// <summary>
/// One connection of a worker to the coordinator's Trainer stream: join, receive the recipe and parameters,
/// compute the gradient of each assigned slice and stream it back, send heartbeats. One outgoing writer
/// task serializes writes (a gRPC stream allows one writer at a time).
/// </summary>
internal sealed class WorkerSession
{
    private readonly WorkerOptions _options;
    private readonly Device _device;
    private readonly Func<string, WorkerModel> _modelFor;
    private readonly ILogger _log;
    /// <summary>Synchronous continuations: a gradient goes onto the socket from the thread that computed it, no thread woken in between.</summary>
    private readonly Channel<WorkerMessage> _outbox = Channel.CreateUnbounded<WorkerMessage>(new UnboundedChannelOptions { SingleReader = true, AllowSynchronousContinuations = true });
    private TensorAssembler? _incomingParameters;
    /// <summary>The push whose gradient sits in the shared region until the coordinator acknowledges it.</summary>
    private (ulong Step, uint Slice)? _sharedGradientInFlight;
    /// <summary>The reused buffer for gradients sent on the stream, and the push its chunks still wrap until acknowledged.</summary>
    private byte[]? _streamGradient;
    private (ulong Step, uint Slice)? _streamGradientInFlight;
    /// <summary>The reused buffer parameters sent on the stream are received into (copied into the network at once).</summary>
    private float[]? _parameterBuffer;
    private string _workerId = "";
    private long _trainSize;

    public WorkerSession(WorkerOptions options, Device device, Func<string, WorkerModel> modelFor, ILogger log)
    {
        _options = options;
        _device = device;
        _modelFor = modelFor;
        _log = log;
    }

    public SessionState State { get; private set; } = SessionState.Connecting;

    /// <summary>Set once the coordinator welcomed this worker (the caller resets its retry back-off then).</summary>
    public bool Joined { get; private set; }

    public async Task<SessionOutcome> RunAsync(TrainerConnect connect, CancellationToken ct)
    {
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        using var call = await connect(Token.Headers(_options.Token), cts.Token);
        var writer = Task.Run(() => WriteLoopAsync(call.RequestStream, cts.Token), CancellationToken.None);
        // A write that failed or timed out ends the session: waiting on for messages from a peer we cannot answer would
        // hang until the transport itself gave up (minutes, for a peer that vanished without closing).
        _ = writer.ContinueWith(_ =>
        {
            try { cts.Cancel(); } catch (ObjectDisposedException) { /* the session ended first */ }
        }, CancellationToken.None, TaskContinuationOptions.OnlyOnFaulted, TaskScheduler.Default);
        try
        {
            State = SessionState.Joining;
            Send(new WorkerMessage
            {
                Join = new Join
                {
                    Host = Environment.MachineName,
                    Device = _device.ToString(),
                    Threads = get_num_threads(),
                    ProtocolVersion = Names.ProtocolVersion,
                    SharedMemory = _options.SharedMemory && SharedTensorSegment.Supported,
                    BootId = SharedTensorSegment.BootId,
                },
            });
            if (!await call.ResponseStream.MoveNext(cts.Token).WaitAsync(_options.CallTimeout, cts.Token))
                return SessionOutcome.Reconnect;
            var first = call.ResponseStream.Current;
            if (first.KindCase == CoordinatorMessage.KindOneofCase.Finish)
                return Finish(first.Finish);
            if (first.KindCase != CoordinatorMessage.KindOneofCase.Welcome)
                throw new ProtocolException(StatusCode.Internal, $"coordinator answered the join with {first.KindCase}, expected Welcome");
            var welcome = first.Welcome;
            _workerId = welcome.WorkerId;
            var model = _modelFor(welcome.RecipeJson);
            CheckLayout(model, welcome);
            _trainSize = welcome.TrainSize;
            using var segment = AnswerSharedMemoryOffer(welcome.SharedMemory, model.Vector.Elements * 4);
            using var sampler = new WorkerSampler(model, _device, Send, _log);
            Joined = true;
            State = SessionState.Ready;
            _log.LogInformation("Joined run {RunId} as {WorkerId}: recipe {Recipe}, {Samples} training samples, device {Device}, {Threads} threads",
                welcome.RunId, _workerId, model.Recipe.Name, welcome.TrainSize, _device, get_num_threads());
            if (ConvolutionCheck.Path != ConvolutionPath.Unchecked) _log.LogInformation("Convolutions: {Convolutions}", ConvolutionCheck.Describe());
            var heartbeat = HeartbeatLoopAsync(TimeSpan.FromMilliseconds(Math.Max(100, welcome.HeartbeatIntervalMs)), cts.Token);

            while (await call.ResponseStream.MoveNext(cts.Token))
            {
                var message = call.ResponseStream.Current;
                switch (message.KindCase)
                {
                    case CoordinatorMessage.KindOneofCase.Parameters when message.Parameters.SharedMemory:
                        ReceiveSharedParameters(model, message.Parameters, segment);
                        break;
                    case CoordinatorMessage.KindOneofCase.Parameters:
                        _incomingParameters = new TensorAssembler(message.Parameters, model.Vector.Elements, "parameters",
                            _parameterBuffer ??= new float[model.Vector.Elements]);
                        break;
                    case CoordinatorMessage.KindOneofCase.ParametersChunk:
                        try
                        {
                            ReceiveParameterChunk(model, message.ParametersChunk);
                        }
                        finally
                        {
                            TensorMessages.Release(message);   // copied into the parameter buffer (or refused)
                        }
                        break;
                    case CoordinatorMessage.KindOneofCase.Assignment:
                        Compute(model, message.Assignment, welcome.GradientDtype, segment);
                        break;
                    case CoordinatorMessage.KindOneofCase.Ack:
                        if (_sharedGradientInFlight == (message.Ack.Step, message.Ack.Slice)) _sharedGradientInFlight = null;
                        if (_streamGradientInFlight == (message.Ack.Step, message.Ack.Slice)) _streamGradientInFlight = null;
                        if (!message.Ack.Applied)
                            _log.LogDebug("Coordinator ignored our push for step {Step} slice {Slice}: {Note}", message.Ack.Step, message.Ack.Slice, message.Ack.Note);
                        break;
                    case CoordinatorMessage.KindOneofCase.Finish:
                        return Finish(message.Finish);
                    case CoordinatorMessage.KindOneofCase.SamplingWeights:
                        sampler.BeginWeights(message.SamplingWeights);
                        break;
                    case CoordinatorMessage.KindOneofCase.SamplingWeightsChunk:
                        sampler.AddWeightsChunk(message.SamplingWeightsChunk);
                        break;
                    case CoordinatorMessage.KindOneofCase.SampleWork:
                        sampler.Enqueue(message.SampleWork);
                        break;
                    case CoordinatorMessage.KindOneofCase.CancelSampleWork:
                        sampler.Cancel(message.CancelSampleWork.JobId);
                        break;
                    default:
                        throw new ProtocolException(StatusCode.Internal, $"unexpected coordinator message {message.KindCase}");
                }
            }
            _log.LogWarning("Coordinator closed the stream; reconnecting");
            return SessionOutcome.Reconnect;
        }
        finally
        {
            State = SessionState.Closed;
            _outbox.Writer.TryComplete();
            await cts.CancelAsync();
#pragma warning disable CA1031 // draining the writer of a stream that is being torn down; any error means it is gone
            try { await writer.WaitAsync(TimeSpan.FromSeconds(5), CancellationToken.None); } catch (Exception) { /* the stream is gone either way */ }
#pragma warning restore CA1031
        }
    }

    private SessionOutcome Finish(Finish finish)
    {
        if (!finish.Reconnect) StepTimeline.Save();   // a worker told to stop may be killed before its exit handlers run
        _log.LogInformation("Coordinator finished the session: {Reason}", finish.Reason);
        return finish.Reconnect ? SessionOutcome.Reconnect : SessionOutcome.Finished;
    }

    private static void CheckLayout(WorkerModel model, Welcome welcome)
    {
        var mine = model.Vector.Shapes.ToList();
        if (mine.Count != welcome.Parameters.Count)
            throw new ProtocolException(StatusCode.FailedPrecondition, $"the coordinator's network has {welcome.Parameters.Count} parameters, this worker's {mine.Count}");
        for (var i = 0; i < mine.Count; i++)
        {
            var theirs = welcome.Parameters[i];
            if (theirs.Name != mine[i].Name || !theirs.Shape.SequenceEqual(mine[i].Shape))
                throw new ProtocolException(StatusCode.FailedPrecondition,
                    $"parameter {i}: coordinator has '{theirs.Name}' [{string.Join(",", theirs.Shape)}], this worker '{mine[i].Name}' [{string.Join(",", mine[i].Shape)}]");
        }
    }

    /// <summary>Maps the offered segment when there is one and it checks out; tells the coordinator either way.</summary>
    private SharedTensorSegment? AnswerSharedMemoryOffer(SharedMemoryOffer? offer, long regionBytes)
    {
        if (offer is null) return null;
        SharedTensorSegment? segment = null;
        string reason;
        if (!_options.SharedMemory) reason = "disabled on this worker";
        else if ((long)offer.RegionBytes != regionBytes) reason = $"offered regions of {offer.RegionBytes} bytes, this network needs {regionBytes}";
        else segment = SharedTensorSegment.TryOpen(offer.Path, offer.Nonce, regionBytes, out reason);
        Send(new WorkerMessage { SharedMemoryReply = new SharedMemoryReply { Accepted = segment is not null, Reason = reason } });
        if (segment is not null) _log.LogInformation("Tensors move through shared memory ({Path})", offer.Path);
        else _log.LogInformation("Tensors move on the stream: {Reason}", reason);
        return segment;
    }

    private static void ReceiveSharedParameters(WorkerModel model, TensorHeader header, SharedTensorSegment? segment)
    {
        if (segment is null)
            throw new ProtocolException(StatusCode.Internal, "parameters announced in shared memory, but this worker mapped no segment");
        if (header.Dtype != DType.Float32)
            throw new ProtocolException(StatusCode.Internal, $"parameters as {header.Dtype}, expected DTYPE_FLOAT32");
        // Read in place into the network, then checked to have been the header's write all along. The coordinator writes
        // the region again only once we have read its last write (we read in stream order); if it ever wrote during our
        // read, the check throws, the session ends with ParameterVersion null (no assignment runs on these values) and
        // the worker reconnects, receiving the parameters anew.
        var payload = TensorAssembler.CheckShared(header, model.Vector.Elements, "parameters", segment, SharedRegion.Parameters);
        model.ParameterVersion = null;
        model.Vector.WriteValues(MemoryMarshal.Cast<byte, float>(payload));
        segment.ExpectSequence(SharedRegion.Parameters, header.SharedSequence, "parameters", after: true);
        model.ParameterVersion = header.ParameterVersion;
        StepTimeline.Mark(StepMark.WorkerLoaded, header.Step);
    }

    private void ReceiveParameterChunk(WorkerModel model, TensorChunk chunk)
    {
        var assembler = _incomingParameters
            ?? throw new ProtocolException(StatusCode.Internal, $"parameter chunk {chunk.Index} arrived without a header");
        assembler.Add(chunk);
        if (!assembler.IsComplete) return;
        model.Vector.WriteValues(assembler.ToFloat32());
        model.ParameterVersion = assembler.Header.ParameterVersion;
        StepTimeline.Mark(StepMark.WorkerLoaded, assembler.Header.Step);
        _incomingParameters = null;
        _log.LogDebug("Loaded parameters version {Version}", model.ParameterVersion);
    }

    private void Compute(WorkerModel model, StepAssignment a, DType dtype, SharedTensorSegment? segment)
    {
        if (model.ParameterVersion != a.ParameterVersion)
            throw new ProtocolException(StatusCode.Internal, $"assignment for parameter version {a.ParameterVersion} but this worker holds {model.ParameterVersion?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "none"}");
        if (a.Indices.Count != a.SampleSeeds.Count)
            throw new ProtocolException(StatusCode.Internal, $"assignment has {a.Indices.Count} indices but {a.SampleSeeds.Count} seeds");
        State = SessionState.Computing;
        StepTimeline.Mark(StepMark.WorkerAssigned, a.Step);
        var clock = Stopwatch.StartNew();
        // A buffer (the shared region, or the reused stream buffer) is ours again once the coordinator acknowledged the
        // push it carried (it copies a shared gradient on arrival; chunks wrap the stream buffer until written).
        // A second slice in the same step before that takes a fresh buffer.
        var bytes = (int)(model.Vector.Elements * 4);
        var shared = segment is not null && dtype != DType.Bfloat16 && _sharedGradientInFlight is null;
        var reuse = !shared && _streamGradientInFlight is null;
        var gradient = shared ? null : reuse ? _streamGradient ??= new byte[bytes] : new byte[bytes];
        Span<byte> values = shared ? segment![SharedRegion.Gradients][..bytes] : gradient;
        if (a.GlobalBatchSize != model.Recipe.BatchSize)
            throw new ProtocolException(StatusCode.Internal, $"assignment for a global batch of {a.GlobalBatchSize}, the recipe's is {model.Recipe.BatchSize}");
        var node = new TreeNode((int)a.FirstMicroBatch, (int)a.EndMicroBatch);
        if (shared) segment!.BeginWrite(SharedRegion.Gradients);
        var (present, loss) = model.Gradient(model.Train(_trainSize), node, a.Indices.ToArray(), a.SampleSeeds.ToArray(), values);
        byte[]? payload = dtype == DType.Bfloat16 ? TensorTransport.ToBFloat16(MemoryMarshal.Cast<byte, float>(values)) : gradient;
        TensorHeader header;
        if (shared)
        {
            header = TensorTransport.SharedHeader(bytes, DType.Float32, model.Vector.Elements, a.Step, a.ParameterVersion, segment!.EndWrite(SharedRegion.Gradients));
            _sharedGradientInFlight = (a.Step, a.Slice);
        }
        else
        {
            header = TensorTransport.Header(payload!, dtype == DType.Bfloat16 ? DType.Bfloat16 : DType.Float32, model.Vector.Elements, a.Step, a.ParameterVersion);
            if (reuse) _streamGradientInFlight = (a.Step, a.Slice);
        }
        var seconds = clock.Elapsed.TotalSeconds;
        StepTimeline.Mark(StepMark.WorkerComputed, a.Step);
        Send(new WorkerMessage
        {
            Gradient = new GradientHeader
            {
                WorkerId = _workerId,
                Step = a.Step,
                ParameterVersion = a.ParameterVersion,
                Slice = a.Slice,
                Tensor = header,
                Present = Google.Protobuf.ByteString.CopyFrom(present),
                Loss = loss,
                SampleCount = (uint)a.Indices.Count,
                ComputeSeconds = seconds,
            },
        });
        if (payload is not null)
            foreach (var chunk in TensorTransport.Chunks(payload, a.Step, a.ParameterVersion))
                Send(new WorkerMessage { GradientChunk = new GradientChunk { WorkerId = _workerId, Slice = a.Slice, Chunk = chunk } });
        State = SessionState.Ready;
        _log.LogDebug("Step {Step} slice {Slice}: {Count} samples in {Seconds:F3} s, loss part {Loss:G4}", a.Step, a.Slice, a.Indices.Count, seconds, loss);
    }

    private void Send(WorkerMessage message)
    {
        if (!_outbox.Writer.TryWrite(message))
            throw new OperationCanceledException("the session is closing");
    }

    private async Task WriteLoopAsync(IClientStreamWriter<WorkerMessage> stream, CancellationToken ct)
    {
        await foreach (var message in _outbox.Reader.ReadAllAsync(ct))
            // Bounded: a peer that stops reading for this long is as good as gone.
            await stream.WriteAsync(message, ct).WaitAsync(_options.CallTimeout, ct);
    }

    private async Task HeartbeatLoopAsync(TimeSpan interval, CancellationToken ct)
    {
        using var timer = new PeriodicTimer(interval);
        try
        {
            while (await timer.WaitForNextTickAsync(ct))
                if (!_outbox.Writer.TryWrite(new WorkerMessage { Heartbeat = new Heartbeat { WorkerId = _workerId } })) return;
        }
        catch (OperationCanceledException)
        {
            // session over
        }
    }
}
