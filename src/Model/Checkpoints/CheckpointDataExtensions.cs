namespace DistDiffusion.Model.Checkpoints;

public static class CheckpointDataExtensions
{
    /// <summary>Releases the checkpoint's CPU tensors once their values have been copied where they are needed.</summary>
    public static void DisposeTensors(this CheckpointData data)
    {
        foreach (var group in new[] { data.Model, data.Ema, data.Optimizer })
            foreach (var t in group.Values) t.Dispose();
    }
}
