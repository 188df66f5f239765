using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Net;
using DistDiffusion.Coordinator.Configuration;
using DistDiffusion.Coordinator.Hosting;
using DistDiffusion.Coordinator.Training;
using DistDiffusion.Coordinator.Cli;
using DistDiffusion.Protocol.V1;
using DistDiffusion.Protocol;

namespace DistDiffusion.Bench;

/// <summary>
/// `bench exchange`: how fast parameters and gradients move through the real coordinator (gRPC
/// on loopback, a worker that computes nothing and pushes zero gradients), next to the raw loopback TCP
/// throughput measured in the same run with the same byte count.
/// </summary>
internal static class ExchangeCommand
{
    public static Command Create()
    {
        var recipe = new Option<string>("--recipe") { Description = "Recipe whose network sets the message sizes", DefaultValueFactory = _ => "mnist-small" };
        var steps = new Option<int>("--steps") { Description = "Steps to exchange, warm-up included", DefaultValueFactory = _ => 1100 };
        var warmup = new Option<int>("--warmup") { Description = "Steps exchanged before the clock starts (the first few hundred run slower while the heap, the JIT's tiers and the sockets settle)", DefaultValueFactory = _ => 100 };
        var transport = new Option<string>("--transport") { Description = "socket (the worker socket, as remote workers use by default), grpc (the gRPC stream, a worker's --transport grpc) or shared-memory (payloads in /dev/shm, messages on the worker socket, as workers under the coordinator's kernel use)", DefaultValueFactory = _ => "socket" };
        var cmd = new Command("exchange", "Measure the parameter + gradient exchange rate against raw loopback TCP") { recipe, steps, warmup, transport };
        cmd.SetAction(p => Run(p.GetValue(recipe)!, p.GetValue(steps), p.GetValue(warmup), p.GetValue(transport)!));
        return cmd;
    }

    private static int Run(string recipe, int steps, int warmup, string transport)
    {
        if (warmup < 1) throw new UsageException($"--warmup {warmup}: expected at least 1 (the first step is always warm-up)");
        if (steps <= warmup) throw new UsageException($"--steps {steps}: expected more than --warmup ({warmup})");
        var (shared, messages) = transport switch
        {
            "socket" => (false, TrainerTransport.Socket),
            "grpc" => (false, TrainerTransport.Grpc),
            "shared-memory" => (true, TrainerTransport.Socket),
            _ => throw new UsageException($"--transport {transport}: expected socket, grpc or shared-memory"),
        };
        if (shared && !SharedTensorSegment.Supported) throw new UsageException("--transport shared-memory: this machine has no /dev/shm");
        var dir = Path.Combine(Path.GetTempPath(), "dd-bench-exchange-" + Guid.NewGuid().ToString("N"));
        try
        {
            var token = Token.Generate();
            var options = new CoordinatorOptions
            {
                Listen = "http://127.0.0.1:0",
                Out = dir,
                Recipe = recipe,
                Steps = steps,
                Set = ["checkpoint-every=0", "sample-every=0"],
            };
            var server = CliSupport.UserInput(() => CoordinatorServer.StartAsync(options, token, Serilog.Events.LogEventLevel.Warning).GetAwaiter().GetResult());
            var (bytes, seconds, busy) = ExchangeAsync(server, token, warmup, shared, messages).GetAwaiter().GetResult();
            var tcp = RawTcpAsync(bytes).GetAwaiter().GetResult();
            var exchange = seconds - busy;
            var rate = bytes / exchange;
            var inv = CultureInfo.InvariantCulture;
            Console.WriteLine(string.Create(inv, $"steps: {steps - warmup} timed after {warmup} of warm-up, {seconds:F2} s wall, of which {busy:F2} s the coordinator's own work (planning, gradient sum, Adam, EMA)"));
            Console.WriteLine(string.Create(inv, $"exchange ({transport}): {bytes / 1048576.0:F1} MiB (parameters down + gradients up) in {exchange:F2} s = {rate / 1048576.0:F1} MiB/s (wall rate including the coordinator's work: {bytes / seconds / 1048576.0:F1} MiB/s)"));
            Console.WriteLine(string.Create(inv, $"raw loopback TCP: {tcp / 1048576.0:F1} MiB/s"));
            Console.WriteLine(string.Create(inv, $"exchange / raw TCP: {rate / tcp:P0}"));
            return CliSupport.ExitOk;
        }
        finally
        {
            if (Directory.Exists(dir)) Directory.Delete(dir, true);
        }
    }

    /// <summary>
    /// A worker that returns a zero gradient at once, through the stream or its shared-memory segment, verifying each
    /// parameter set as a worker does (its checksum on the stream, its write sequence in shared memory); bytes moved and time from step <paramref name="warmup"/>'s assignment (the steps before it are warm-up) to the last step.
    /// </summary>
    private static async Task<(long Bytes, double Seconds, double Busy)> ExchangeAsync(CoordinatorServer started, string token, int warmup, bool shared, TrainerTransport messages)
    {
        await using var server = started;
        using var channel = ClientChannel.Create(server.Address);
        TrainerConnect connect = messages == TrainerTransport.Socket
            ? SocketTrainerCall.Connector(server.Address, null, TimeSpan.FromSeconds(30))
            : (headers, ct) => Task.FromResult(new PooledTrainerClient(channel).ConnectPooled(headers, cancellationToken: ct));
        using var call = await connect(Token.Headers(token), CancellationToken.None);
        await call.RequestStream.WriteAsync(new WorkerMessage
        {
            Join = new Join { Host = "benchmark", Device = "none", Threads = 1, ProtocolVersion = Names.ProtocolVersion, SharedMemory = shared, BootId = SharedTensorSegment.BootId },
        });
        Welcome? welcome = null;
        SharedTensorSegment? segment = null;
        float[]? received = null;
        TensorAssembler? parameters = null;
        long elements = 0, bytes = 0;
        var clock = new Stopwatch();
        var busyAtStart = 0.0;
        byte[] zeros = [];
        try
        {
            while (await call.ResponseStream.MoveNext(CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(60)))
            {
                var m = call.ResponseStream.Current;
                switch (m.KindCase)
                {
                    case CoordinatorMessage.KindOneofCase.Welcome:
                        welcome = m.Welcome;
                        elements = welcome.Parameters.Sum(p => p.Shape.Aggregate(1L, (a, b) => a * b));
                        zeros = new byte[elements * 4];
                        if (shared)
                        {
                            var offer = welcome.SharedMemory ?? throw new InvalidOperationException("the coordinator made no shared-memory offer");
                            segment = SharedTensorSegment.TryOpen(offer.Path, offer.Nonce, (long)offer.RegionBytes, out var reason)
                                ?? throw new InvalidOperationException("cannot map the offered segment: " + reason);
                            await call.RequestStream.WriteAsync(new WorkerMessage { SharedMemoryReply = new SharedMemoryReply { Accepted = true } });
                        }
                        break;
                    case CoordinatorMessage.KindOneofCase.Parameters when m.Parameters.SharedMemory:
                        // Copied out and checked against the region's write sequence, as a worker does.
                        TensorAssembler.CopyShared(m.Parameters, elements, "parameters", segment!, SharedRegion.Parameters, received ??= new float[elements]);
                        if (clock.IsRunning) bytes += (long)m.Parameters.ByteLength;
                        break;
                    case CoordinatorMessage.KindOneofCase.Parameters:
                        parameters = new TensorAssembler(m.Parameters, elements, "parameters");
                        break;
                    case CoordinatorMessage.KindOneofCase.ParametersChunk:
                        parameters!.Add(m.ParametersChunk);
                        TensorMessages.Release(m);   // as a worker does once the bytes are in its buffer
                        if (parameters.IsComplete)
                        {
                            parameters.ToFloat32();   // checksum and decode, as a worker does
                            if (clock.IsRunning) bytes += (long)parameters.Header.ByteLength;
                        }
                        break;
                    case CoordinatorMessage.KindOneofCase.Assignment:
                        var a = m.Assignment;
                        if (a.Step == (ulong)warmup)
                        {
                            clock.Start();
                            busyAtStart = server.Loop.BusySeconds;
                        }
                        var header = segment is not null
                            // What a worker writes: one gradient's bytes, as one write of the region.
                            ? TensorTransport.SharedHeader(zeros.Length, DType.Float32, elements, a.Step, a.ParameterVersion, segment.Write(SharedRegion.Gradients, zeros))
                            : TensorTransport.Header(zeros, DType.Float32, elements, a.Step, a.ParameterVersion);
                        await call.RequestStream.WriteAsync(new WorkerMessage
                        {
                            Gradient = new GradientHeader
                            {
                                WorkerId = welcome!.WorkerId,
                                Step = a.Step,
                                ParameterVersion = a.ParameterVersion,
                                Slice = a.Slice,
                                Tensor = header,
                                Present = Google.Protobuf.ByteString.CopyFrom(new byte[(welcome.Parameters.Count + 7) / 8]),
                                SampleCount = (uint)a.Indices.Count,
                            },
                        });
                        if (segment is null)
                            foreach (var c in TensorTransport.Chunks(zeros, a.Step, a.ParameterVersion))
                                await call.RequestStream.WriteAsync(new WorkerMessage { GradientChunk = new GradientChunk { WorkerId = welcome.WorkerId, Slice = a.Slice, Chunk = c } });
                        if (clock.IsRunning) bytes += zeros.Length;
                        break;
                    case CoordinatorMessage.KindOneofCase.Finish:
                        clock.Stop();
                        return (bytes, clock.Elapsed.TotalSeconds, server.Loop.BusySeconds - busyAtStart);
                }
            }
        }
        finally
        {
            segment?.Dispose();
        }
        throw new InvalidOperationException("the coordinator closed the stream before training completed");
    }

    /// <summary>Bytes/s of a plain TCP connection on loopback moving <paramref name="bytes"/> in 1 MiB writes.</summary>
    private static async Task<double> RawTcpAsync(long bytes)
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        var port = ((IPEndPoint)listener.LocalEndpoint).Port;
        var receive = Task.Run(async () =>
        {
            using var s = await listener.AcceptTcpClientAsync();
            var stream = s.GetStream();
            var buffer = new byte[1 << 20];
            long got = 0;
            while (got < bytes)
            {
                var n = await stream.ReadAsync(buffer);
                if (n == 0) break;
                got += n;
            }
        });
        using var client = new TcpClient();
        await client.ConnectAsync(IPAddress.Loopback, port);
        client.NoDelay = true;
        var send = client.GetStream();
        var chunk = new byte[1 << 20];
        var clock = Stopwatch.StartNew();
        for (long sent = 0; sent < bytes; sent += chunk.Length)
            await send.WriteAsync(chunk.AsMemory(0, (int)Math.Min(chunk.Length, bytes - sent)));
        await receive;
        return bytes / clock.Elapsed.TotalSeconds;
    }
}
