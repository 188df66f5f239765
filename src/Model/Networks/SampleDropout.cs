using static TorchSharp.torch;

namespace DistDiffusion.Model.Networks;

/// <summary>
/// Inverted dropout whose mask for sample i is drawn from a generator seeded with
/// <c>Randomness.DropoutLayer(seeds[i], LayerIndex)</c>: keep = rand(perSampleShape) &gt;= p, y = x * keep / (1 - p).
/// A sample's mask therefore does not depend on which batch or worker computes it (the distributed
/// trainer relies on this). Identity in eval mode or with p = 0.
/// </summary>
public sealed class SampleDropout : nn.Module<Tensor, Tensor>
{
    private readonly DropoutSeeds seeds;
    // One generator per device, re-seeded per sample with manual_seed.
    private readonly Dictionary<string, Generator> generators = new(StringComparer.Ordinal);

    internal SampleDropout(double p, DropoutSeeds seeds, long layerIndex)
        : base(nameof(SampleDropout))
    {
        if (p < 0 || p >= 1)
            throw new ArgumentException($"recipe field 'dropout' = {p}: expected a value in [0, 1)");
        P = p;
        this.seeds = seeds;
        LayerIndex = layerIndex;
        RegisterComponents();
    }

    /// <summary>Drop probability.</summary>
    public double P { get; }

    /// <summary>Fixed index k of this layer within its network (construction order).</summary>
    public long LayerIndex { get; }

    public override Tensor forward(Tensor x)
    {
        if (!training || P == 0)
            return x;
        var rows = seeds.Seeds ?? throw new InvalidOperationException("SampleDropout in training mode: no sample seeds set (DenoiserNetwork.SetSampleSeeds)");
        var batch = x.shape[0];
        if (rows.Length != batch)
            throw new InvalidOperationException($"{rows.Length} sample seeds set but the batch has {batch} rows");
        var device = x.device;
        var generator = GeneratorFor(device);
        var perSample = x.shape[1..];
        using var scope = NewDisposeScope();
        var masks = new Tensor[batch];
        for (var i = 0; i < batch; i++)
        {
            generator.manual_seed(Randomness.DropoutLayer(rows[i], LayerIndex));
            masks[i] = rand(perSample, dtype: ScalarType.Float32, device: device, generator: generator);
        }
        // keep: [B, ...perSample], 1 where the unit survives.
        var keep = stack(masks).ge(P).to(x.dtype);
        return x.mul(keep).mul(1.0 / (1.0 - P)).MoveToOuterDisposeScope();
    }

    private Generator GeneratorFor(Device device)
    {
        var key = device.ToString();
        if (!generators.TryGetValue(key, out var g))
        {
            g = new Generator(0, device);
            generators[key] = g;
        }
        return g;
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            foreach (var g in generators.Values)
                g.Dispose();
            generators.Clear();
        }
        base.Dispose(disposing);
    }
}
