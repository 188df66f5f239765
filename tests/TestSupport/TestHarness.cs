using DistDiffusion.Coordinator.Cli;

namespace DistDiffusion.Tests;

/// <summary>Runs a command line in process with stdout and stderr captured (callers run one at a time).</summary>
internal static class CliHarness
{
    public static (int Code, string Out, string Err) Run(params string[] args) => Capture(() => CoordinatorCli.Run(args));

    /// <summary>Runs an entry point (a command line's Run) with stdout and stderr captured.</summary>
    public static (int Code, string Out, string Err) Capture(Func<int> run)
    {
        var (oldOut, oldErr) = (Console.Out, Console.Error);
        using var o = new StringWriter();
        using var e = new StringWriter();
        Console.SetOut(o);
        Console.SetError(e);
        try
        {
            return (run(), o.ToString(), e.ToString());
        }
        finally
        {
            Console.SetOut(oldOut);
            Console.SetError(oldErr);
        }
    }
}

/// <summary>A test class with its own temporary folder, deleted afterwards.</summary>
public abstract class TempFolderTest : IDisposable
{
    private readonly TempFolder _folder;

    protected TempFolderTest(string prefix) => _folder = new TempFolder(prefix);

    protected string Dir => _folder.Path;

    public void Dispose()
    {
        Dispose(true);
        GC.SuppressFinalize(this);
    }

    protected virtual void Dispose(bool disposing)
    {
        if (disposing) _folder.Dispose();
    }
}
