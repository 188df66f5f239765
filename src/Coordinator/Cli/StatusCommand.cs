using System.CommandLine;
using System.Globalization;
using DistDiffusion.Protocol;
using DistDiffusion.Protocol.V1;
using Google.Protobuf;
using Grpc.Core;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>`coordinator status [--address URL] [--json]`: the run and its workers. Exit 1 when the coordinator cannot be reached.</summary>
internal static class StatusCommand
{
    public static Command Create()
    {
        var address = CliSupport.AddressOption();
        var tokenFile = CliSupport.TokenFileOption();
        var json = new Option<bool>("--json") { Description = "Print the status as JSON (the StatusReply message)" };
        var timeout = new Option<double>("--timeout") { Description = "Seconds to wait for the coordinator", DefaultValueFactory = _ => 10 };
        var tlsCa = new Option<string?>("--tls-ca") { Description = "CA certificate (PEM) to trust for an https coordinator" };
        var run = RunEndpoints.RunOption();
        var watch = new Option<bool>("--watch") { Description = "Refresh until interrupted (Ctrl+C)" };
        var interval = new Option<double>("--interval") { Description = "With --watch: seconds between refreshes", DefaultValueFactory = _ => 2 };
        var cmd = new Command("status", "Show a running coordinator's run and workers") { address, tokenFile, run, json, timeout, tlsCa, watch, interval };
        cmd.SetAction(p =>
        {
            var addressText = p.GetValue(address)!;
            var tokenPath = p.GetValue(tokenFile);
            if (p.GetValue(run) is { } dir)
            {
                if (p.GetResult(address) is { Implicit: false } || tokenPath is not null)
                    throw new UsageException("--run DIR gives the address and the token: drop --address and --token-file");
                var found = RunEndpoints.Read(dir);
                (addressText, tokenPath) = (found.Grpc.ToString(), found.TokenFile);
            }
            return Run(addressText, tokenPath, p.GetValue(json), p.GetValue(timeout), p.GetValue(tlsCa), p.GetValue(watch), p.GetValue(interval));
        });
        return cmd;
    }

    private static int Run(string addressText, string? tokenFile, bool json, double timeoutSeconds, string? tlsCa, bool watch, double intervalSeconds)
    {
        if (!(timeoutSeconds > 0)) throw new UsageException($"--timeout {timeoutSeconds}: expected seconds > 0");
        if (!(intervalSeconds > 0) || !double.IsFinite(intervalSeconds)) throw new UsageException($"--interval {intervalSeconds}: expected seconds > 0");
        var address = CliSupport.UserInput(() => ClientChannel.ParseAddress(addressText, "--address"));
        var token = CliSupport.UserInput(() => Token.ResolveClient(tokenFile));
        using var channel = CliSupport.UserInput(() => ClientChannel.Create(address, tlsCa));
        var client = new Coordination.CoordinationClient(channel);
        if (!watch) return Once(client, address, token, json, timeoutSeconds, clear: false);
        // --watch: until Ctrl+C, SIGINT or SIGTERM; an unreachable coordinator is reported and asked again.
        using var cts = new CancellationTokenSource();
        using var signals = StopSignals.Register(cts);
        var clear = !Console.IsOutputRedirected && !json;
        while (!cts.IsCancellationRequested)
        {
            Once(client, address, token, json, timeoutSeconds, clear);
            Console.Out.Flush();
            cts.Token.WaitHandle.WaitOne(TimeSpan.FromSeconds(intervalSeconds));
        }
        return CliSupport.ExitOk;
    }

    private static int Once(Coordination.CoordinationClient client, Uri address, string? token, bool json, double timeoutSeconds, bool clear)
    {
        StatusReply reply;
        try
        {
            reply = client.GetStatus(new GetStatusRequest(), Token.Headers(token), DateTime.UtcNow.AddSeconds(timeoutSeconds));
        }
        catch (RpcException e)
        {
            Console.Error.WriteLine(CliSupport.DescribeRpcFailure(e, address));
            return CliSupport.ExitFailure;
        }
        if (clear) Console.Write("\u001b[H\u001b[2J");
        if (json)
        {
            Console.WriteLine(new JsonFormatter(JsonFormatter.Settings.Default.WithFormatDefaultValues(true)).Format(reply));
            return CliSupport.ExitOk;
        }
        var inv = CultureInfo.InvariantCulture;
        Console.WriteLine(string.Create(inv, $"run {reply.RunId}: recipe {reply.Recipe}, {Describe(reply.State)}"));
        Console.WriteLine(string.Create(inv, $"step {reply.Step} of {reply.TargetStep} (epoch {reply.Epoch}, parameter version {reply.ParameterVersion}), loss {reply.Loss:G4}, {reply.SamplesPerSecond:F1} samples/s"));
        Console.WriteLine(reply.LastCheckpoint.Length > 0 ? $"last checkpoint: step {reply.LastCheckpointStep} at {reply.LastCheckpoint}" : "last checkpoint: none yet");
        Console.WriteLine();
        Console.WriteLine($"{"worker",-12} {"host",-16} {"device",-8} {"threads",7} {"state",-8} {"steps",7} {"s/step",8} {"seen",7} {"in",10} {"out",10} {"tensors",-7}");
        foreach (var w in reply.Workers)
            Console.WriteLine(string.Create(inv,
                $"{w.Id,-12} {Truncate(w.Host, 16),-16} {Truncate(w.Device, 8),-8} {w.Threads,7} {Describe(w.State),-8} {w.StepsDone,7} {w.MeanStepSeconds,8:F3} {w.LastSeenSecondsAgo,6:F1}s {Bytes(w.BytesIn),10} {Bytes(w.BytesOut),10} {(w.SharedMemory ? "shm" : w.Socket ? "socket" : "grpc"),-7}"));
        if (reply.Workers.Count == 0 && reply.WorkersOmitted == 0) Console.WriteLine("(no workers)");
        if (reply.WorkersOmitted > 0) Console.WriteLine(string.Create(inv, $"({reply.WorkersOmitted} more workers not listed: the reply would exceed its size limit)"));
        return CliSupport.ExitOk;
    }

    private static string Describe(RunState s) => s switch
    {
        RunState.WaitingForWorkers => "waiting for workers",
        RunState.Training => "training",
        RunState.Complete => "training complete",
        RunState.Serving => "serving a checkpoint",
        RunState.Failed => "failed (see the coordinator log; the last completed step is checkpointed)",
        _ => "unknown",
    };

    private static string Describe(WorkerState s) => s switch
    {
        WorkerState.Joining => "joining",
        WorkerState.Idle => "idle",
        WorkerState.Busy => "busy",
        WorkerState.Dropped => "dropped",
        WorkerState.Left => "left",
        _ => "unknown",
    };

    private static string Truncate(string s, int n) => s.Length <= n ? s : s[..(n - 1)] + "~";

    private static string Bytes(ulong b) => b switch
    {
        < 1024 => $"{b} B",
        < 1024 * 1024 => string.Create(CultureInfo.InvariantCulture, $"{b / 1024.0:F1} KiB"),
        < 1024UL * 1024 * 1024 => string.Create(CultureInfo.InvariantCulture, $"{b / 1048576.0:F1} MiB"),
        _ => string.Create(CultureInfo.InvariantCulture, $"{b / 1073741824.0:F2} GiB"),
    };
}
