using System.Buffers.Binary;
using System.IO.Hashing;
using DistDiffusion.Coordinator.Training;
using DistDiffusion.Coordinator.Transport;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;
using Google.Protobuf;
using Grpc.Core;
using Microsoft.Extensions.Logging.Abstractions;

namespace DistDiffusion.Fuzz.Targets;

/// <summary>
/// A worker's stream as the coordinator's <see cref="TrainerService"/> handles it, against the real in-process coordinator
/// (<see cref="FuzzCoordinator"/>): the input is length-delimited WorkerMessages, sent in order on one stream (the first is
/// normally the Join). After the Welcome the stream waits for the worker's assignment, then sends the rest; placeholders
/// make an input speak of whatever the run is at:
/// <list type="bullet">
/// <item>worker_id "$": the id the Welcome gave;</item>
/// <item>step and parameter_version 0xFFFFFFFF (header, tensor header, chunk): the assignment's; slice 0xFFFF: its slice;
/// sample_count 0xFFFF: its sample count; present "$": every parameter present;</item>
/// <item>tensor shape [-1]: the run's element count; byte_length 0xFFFFFFFF: that many elements of the dtype;
/// chunk_count 0xFFFF: the chunks they need; checksum 1: the checksum of the chunks that follow the header (index order);</item>
/// <item>a chunk whose data has 5 bytes: (u32 length, at most 1 MiB + 16) copies of its fifth byte.</item>
/// </list>
/// Expected: the call ends normally or with an RpcException carrying a status other than Unknown and a detail. After every
/// input (the loop has handled the worker's departure): the training state (step, parameter checksum) changed exactly
/// when a push was acknowledged as applied.
/// </summary>
public sealed class StepTarget : FuzzTarget
{
    public const uint Placeholder = uint.MaxValue;
    public const uint SlicePlaceholder = 0xFFFF;
    private const int MaxMessages = 256;

    public override string Name => "step";

    protected override bool AllThreads => true;

    protected override void Run(byte[] input) => RunAsync(input).GetAwaiter().GetResult();

    private static List<WorkerMessage> Parse(byte[] input)
    {
        using var stream = new CodedInputStream(input);
        var messages = new List<WorkerMessage>();
        while (!stream.IsAtEnd && messages.Count < MaxMessages)
        {
            var m = new WorkerMessage();
            stream.ReadMessage(m);
            messages.Add(m);
        }
        return messages;
    }

    private static async Task RunAsync(byte[] input)
    {
        List<WorkerMessage> messages;
        try
        {
            messages = Parse(input);
        }
        catch (InvalidProtocolBufferException)
        {
            return;   // not a list of messages: nothing reaches the coordinator
        }
        var coordinator = FuzzCoordinator.Instance;
        var before = coordinator.State;
        var service = new TrainerService(coordinator.Loop, coordinator.Server.Sampling, coordinator.Options, NullLogger<TrainerService>.Instance);
        var responses = new RecordingWriter();
        var requests = new Requests(messages, responses, coordinator);
        using var closed = new CancellationTokenSource();
        var context = new TrainerSocketEndpoint.SocketCallContext("/distdiffusion.v1.Trainer/Connect", "fuzz", closed.Token);
        var outcome = "stream ended";
        try
        {
            await service.Connect(requests, responses, context);
        }
        catch (RpcException e) when (FuzzCoordinator.IsStatus(e))
        {
            outcome = $"{e.StatusCode}: {e.Status.Detail}";   // a refused stream: its status says why
        }
        catch (RpcException e)
        {
            throw new FuzzFindingException($"step: the stream ended with {e.StatusCode} '{e.Status.Detail}'");
        }
        if (requests.WorkerId is { } id) await coordinator.AwaitGoneAsync(id);
        await coordinator.BarrierAsync();
        FuzzCoordinator.CheckState("step", before, coordinator.State, responses.Messages);
        Note($"{outcome}; step {before.Steps} -> {coordinator.State.Steps}");
    }

    /// <summary>The worker's side: the input's messages, placeholders filled in from the Welcome and the assignment.</summary>
    private sealed class Requests(List<WorkerMessage> messages, RecordingWriter responses, FuzzCoordinator coordinator) : IAsyncStreamReader<WorkerMessage>
    {
        private int _next;
        private StepAssignment? _assignment;

        public string? WorkerId { get; private set; }
        public WorkerMessage Current { get; private set; } = null!;

        public async Task<bool> MoveNext(CancellationToken cancellationToken)
        {
            if (_next == 1)
            {
                // The Join is in: wait for the Welcome (a refused Join ends the call instead) and the first assignment.
                var welcome = await responses.AwaitAsync(CoordinatorMessage.KindOneofCase.Welcome, TimeSpan.FromSeconds(2));
                if (welcome is not null)
                {
                    WorkerId = welcome.Welcome.WorkerId;
                    _assignment = (await responses.AwaitAsync(CoordinatorMessage.KindOneofCase.Assignment, TimeSpan.FromSeconds(10)))?.Assignment
                        ?? throw new FuzzFindingException($"step: worker {WorkerId} joined but got no assignment within 10 s");
                }
            }
            if (_next >= messages.Count)
            {
                // Every push is in: let the loop take it, and if it applied one, the acknowledgement reach this stream.
                var before = coordinator.State;
                await coordinator.BarrierAsync();
                if (coordinator.State != before)
                    await responses.AwaitAsync(CoordinatorMessage.KindOneofCase.Ack, TimeSpan.FromSeconds(5), m => m.Ack.Applied);
                return false;
            }
            Current = Fill(messages, _next++);
            return true;
        }

        private WorkerMessage Fill(List<WorkerMessage> all, int index)
        {
            var m = all[index].Clone();
            var a = _assignment;
            var elements = coordinator.Loop.Description.ParameterElements;
            switch (m.KindCase)
            {
                case WorkerMessage.KindOneofCase.Heartbeat:
                    m.Heartbeat.WorkerId = Id(m.Heartbeat.WorkerId);
                    break;
                case WorkerMessage.KindOneofCase.Leave:
                    m.Leave.WorkerId = Id(m.Leave.WorkerId);
                    break;
                case WorkerMessage.KindOneofCase.Gradient:
                    var h = m.Gradient;
                    h.WorkerId = Id(h.WorkerId);
                    if (a is not null)
                    {
                        if (h.Step == Placeholder) h.Step = a.Step;
                        if (h.ParameterVersion == Placeholder) h.ParameterVersion = a.ParameterVersion;
                        if (h.Slice == SlicePlaceholder) h.Slice = a.Slice;
                        if (h.SampleCount == SlicePlaceholder) h.SampleCount = (uint)a.Indices.Count;
                    }
                    if (h.Present.Length == 1 && h.Present[0] == '$')
                        h.Present = ByteString.CopyFrom(Enumerable.Repeat((byte)0xFF, (coordinator.Loop.Description.ParameterCount + 7) / 8).ToArray());
                    if (h.Tensor is { } t)
                    {
                        if (a is not null && t.Step == Placeholder) t.Step = a.Step;
                        if (a is not null && t.ParameterVersion == Placeholder) t.ParameterVersion = a.ParameterVersion;
                        if (t.Shape.Count == 1 && t.Shape[0] == -1) t.Shape[0] = elements;
                        var size = t.Dtype == DType.Bfloat16 ? 2 : 4;
                        if (t.ByteLength == Placeholder) t.ByteLength = (ulong)(elements * size);
                        if (t.ChunkCount == SlicePlaceholder) t.ChunkCount = TensorTransport.ChunkCount((long)t.ByteLength);
                        if (t.Checksum == 1)
                        {
                            var hash = new XxHash3();
                            foreach (var c in all.Skip(index + 1).TakeWhile(x => x.KindCase != WorkerMessage.KindOneofCase.Gradient)
                                         .Where(x => x.KindCase == WorkerMessage.KindOneofCase.GradientChunk && x.GradientChunk.Chunk is not null)
                                         .Select(x => x.GradientChunk.Chunk).DistinctBy(c => c.Index).OrderBy(c => c.Index))
                                hash.Append(Expand(c.Data).Span);
                            t.Checksum = hash.GetCurrentHashAsUInt64();
                        }
                    }
                    break;
                case WorkerMessage.KindOneofCase.GradientChunk:
                    var g = m.GradientChunk;
                    g.WorkerId = Id(g.WorkerId);
                    if (a is not null && g.Slice == SlicePlaceholder) g.Slice = a.Slice;
                    if (g.Chunk is { } chunk)
                    {
                        if (a is not null && chunk.Step == Placeholder) chunk.Step = a.Step;
                        if (a is not null && chunk.ParameterVersion == Placeholder) chunk.ParameterVersion = a.ParameterVersion;
                        chunk.Data = Expand(chunk.Data);
                    }
                    break;
            }
            return m;
        }

        private string Id(string id) => id == "$" ? WorkerId ?? "" : id;

        private static ByteString Expand(ByteString data)
        {
            if (data.Length != 5) return data;
            var fill = new byte[Math.Min(BinaryPrimitives.ReadUInt32LittleEndian(data.Span), TensorTransport.ChunkBytes + 16)];
            fill.AsSpan().Fill(data[4]);
            return UnsafeByteOperations.UnsafeWrap(fill);
        }
    }

    protected override bool Expected(Exception e) => false;

    // The coordinator's own work for an input (a step, its broadcast) and the messages: a few MiB; a limit far above that.
    protected override long AllocationLimit(byte[] input) => 16L * input.Length + (64L << 20);

    public override IEnumerable<(string Name, byte[] Bytes)> Seeds()
    {
        var join = new WorkerMessage { Join = new Join { Host = "fuzz", Device = "cpu", Threads = 1, ProtocolVersion = Names.ProtocolVersion } };
        var elements = FuzzCoordinator.Instance.Loop.Description.ParameterElements;
        var values = new float[elements];
        for (var i = 0; i < values.Length; i++) values[i] = (i % 7 - 3) * 1e-3f;
        var bytes = System.Runtime.InteropServices.MemoryMarshal.AsBytes(values.AsSpan()).ToArray();
        WorkerMessage Header(Action<GradientHeader>? change = null, DType dtype = DType.Float32)
        {
            var h = new GradientHeader
            {
                WorkerId = "$", Step = Placeholder, ParameterVersion = Placeholder, Slice = SlicePlaceholder, SampleCount = SlicePlaceholder,
                Present = ByteString.CopyFromUtf8("$"), Loss = 0.25, ComputeSeconds = 0.01,
                Tensor = new TensorHeader { Step = Placeholder, ParameterVersion = Placeholder, Dtype = dtype, Shape = { -1 }, ByteLength = Placeholder, Checksum = 1, ChunkCount = SlicePlaceholder },
            };
            change?.Invoke(h);
            return new WorkerMessage { Gradient = h };
        }
        WorkerMessage Chunk(byte[] data, uint index = 0) => new()
        {
            GradientChunk = new GradientChunk { WorkerId = "$", Slice = SlicePlaceholder, Chunk = new TensorChunk { Step = Placeholder, ParameterVersion = Placeholder, Index = index, Data = ByteString.CopyFrom(data) } },
        };
        static byte[] Delimited(params WorkerMessage[] messages)
        {
            using var ms = new MemoryStream();
            using var output = new CodedOutputStream(ms, leaveOpen: true);
            foreach (var m in messages) output.WriteMessage(m);
            output.Flush();
            return ms.ToArray();
        }
        var heartbeat = new WorkerMessage { Heartbeat = new Heartbeat { WorkerId = "$" } };
        yield return ("join-only", Delimited(join));
        yield return ("valid-push", Delimited(join, heartbeat, Header(), Chunk(bytes)));
        yield return ("valid-push-bfloat16", Delimited(join, Header(dtype: DType.Bfloat16), Chunk(TensorTransport.ToBFloat16(values))));
        yield return ("push-twice", Delimited(join, Header(), Chunk(bytes), Header(), Chunk(bytes)));
        yield return ("push-filled", Delimited(join, Header(), Chunk([.. BitConverter.GetBytes((uint)bytes.Length), 0x3c])));
        yield return ("push-then-leave", Delimited(join, Header(), Chunk(bytes), new WorkerMessage { Leave = new Leave { WorkerId = "$", Reason = "done" } }));
        yield return ("sample-output", Delimited(join, new WorkerMessage { SampleOutput = new SampleOutput { JobId = 1, Count = 2, Error = "x" } }));
        yield return ("shared-memory-reply", Delimited(join, new WorkerMessage { SharedMemoryReply = new SharedMemoryReply { Accepted = true } }));
    }
}
