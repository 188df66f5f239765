using System.Diagnostics;
using System.Globalization;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>
/// A one-line progress bar on stderr (rewritten in place on a terminal; one line every 5% otherwise)
/// showing count, rate, ETA and a caller-supplied status such as the loss.
/// </summary>
public sealed class ProgressBar
{
    private readonly string _label;
    private readonly long _total;
    private readonly long _start;
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private readonly bool _interactive = !Console.IsErrorRedirected;
    private readonly string _unit;
    private long _lastPrinted = -1;
    private double _lastDraw = -1;

    public ProgressBar(string label, long start, long total, string unit = "steps")
    {
        _label = label;
        _start = start;
        _total = total;
        _unit = unit;
    }

    public void Update(long done, string status = "")
    {
        var elapsed = _clock.Elapsed.TotalSeconds;
        var finished = done >= _total;
        if (_interactive)
        {
            if (!finished && elapsed - _lastDraw < 0.1) return;
        }
        else
        {
            var every = Math.Max(1, (_total - _start) / 20);
            if (!finished && done - Math.Max(_lastPrinted, _start) < every) return;
            if (done == _lastPrinted) return;
        }
        _lastDraw = elapsed;
        _lastPrinted = done;
        Console.Error.Write(Render(done, elapsed, status) + (_interactive ? (finished ? "\n" : "\r") : "\n"));
    }

    private string Render(long done, double elapsed, string status)
    {
        var inv = CultureInfo.InvariantCulture;
        var frac = _total > 0 ? Math.Clamp((double)done / _total, 0, 1) : 1;
        const int width = 24;
        var filled = (int)Math.Round(frac * width);
        var bar = new string('#', filled) + new string('.', width - filled);
        var rate = elapsed > 0 ? (done - _start) / elapsed : 0;
        var eta = rate > 0 ? TimeSpan.FromSeconds((_total - done) / rate) : TimeSpan.Zero;
        var line = string.Create(inv, $"{_label} [{bar}] {done}/{_total} {status} {rate:F1} {_unit}/s ETA {eta:hh\\:mm\\:ss}");
        return _interactive ? line.PadRight(110) : line;
    }
}
