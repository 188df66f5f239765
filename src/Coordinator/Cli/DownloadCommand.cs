using System.CommandLine;
using DistDiffusion.Model.Data;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>`coordinator download`: fetches MNIST or Fashion-MNIST (train + test) and verifies every file's checksum.</summary>
internal static class DownloadCommand
{
    public static Command Create()
    {
        var dataset = new Option<string>("--dataset") { Description = "mnist or fashion-mnist", Required = true };
        var output = new Option<string>("--out") { Description = "Folder for the IDX .gz files (e.g. data/fashion-mnist)", Required = true };
        var cmd = new Command("download", "Download MNIST or Fashion-MNIST into a folder, verifying checksums (files already present and correct are kept)")
        {
            dataset, output,
        };
        cmd.SetAction(p => Run(p.GetValue(dataset)!, p.GetValue(output)!));
        return cmd;
    }

    private static int Run(string datasetName, string folder)
    {
        var kind = datasetName.Trim().ToLowerInvariant() switch
        {
            "mnist" => DatasetKind.Mnist,
            "fashion-mnist" or "fashionmnist" => DatasetKind.FashionMnist,
            _ => throw new UsageException($"--dataset {datasetName}: expected mnist or fashion-mnist"),
        };
        Directory.CreateDirectory(folder);
        DatasetDownloader.DownloadAsync(kind, folder).GetAwaiter().GetResult();
        Console.WriteLine($"{datasetName}: all files present and verified in {Path.GetFullPath(folder)}");
        return CliSupport.ExitOk;
    }
}
