using DistDiffusion.Model;
using DistDiffusion.Model.Training;

namespace DistDiffusion.Tests.Training;

public sealed class RandomnessTests
{
    [Fact]
    public void NoTwoStreamsShareAKeyExceptTheListedOverlaps()
    {
        var streams = Randomness.Streams;
        Assert.Equal(streams.Count, streams.Select(s => s.Name).Distinct().Count());
        var listed = Randomness.Overlaps.Select(o => Pair(o.A, o.B)).ToHashSet();
        Assert.Equal(Randomness.Overlaps.Count, listed.Count);
        Assert.All(Randomness.Overlaps, o => Assert.Contains(streams, s => s.Name == o.A));
        Assert.All(Randomness.Overlaps, o => Assert.Contains(streams, s => s.Name == o.B));
        var found = new HashSet<(string, string)>();
        for (var i = 0; i < streams.Count; i++)
            for (var j = i + 1; j < streams.Count; j++)
                if (!Randomness.Separated(streams[i], streams[j]))
                    found.Add(Pair(streams[i].Name, streams[j].Name));
        // A new stream must come with a tag of its own; the listed pairs are exactly those the rule does not separate.
        Assert.Equal(listed.Order(), found.Order());
    }

    [Fact]
    public void TagsAndSamplePositionsAreDistinct()
    {
        ulong[] tags = [Randomness.SamplingTag, Randomness.DataOrderTag, Randomness.FloorTag, Randomness.SlicedWassersteinTag,
            Randomness.VerifyTag, Randomness.SplitTag, Randomness.ClassifierTag];
        Assert.Equal(tags.Length, tags.Distinct().Count());
        Assert.All(tags, t => Assert.False(t is >= Randomness.FloorTag + 1 and <= Randomness.FloorTag + 255, $"0x{t:X} is among the floor draws' tags"));
        ulong[] positions = [Randomness.TimestepPosition, Randomness.FlipPosition, Randomness.DropoutPosition];
        Assert.Equal(positions.Length, positions.Distinct().Count());
        Assert.NotEqual(Randomness.SyntheticTrainTag, Randomness.SyntheticHeldOutTag);
    }

    [Fact]
    public void SeparatedTellsTagsFromVariableRanges()
    {
        var a = new RandomStream("a", RandomConsumer.CounterRng, "seed", [KeyPart.Var("i"), KeyPart.Tag(7)], "");
        var b = new RandomStream("b", RandomConsumer.CounterRng, "seed", [KeyPart.Var("i"), KeyPart.Tag(8)], "");
        var small = new RandomStream("c", RandomConsumer.CounterRng, "seed", [KeyPart.Var("i"), KeyPart.Var("t", 6)], "");
        var large = new RandomStream("d", RandomConsumer.CounterRng, "seed", [KeyPart.Var("i"), KeyPart.Var("t", 7)], "");
        Assert.True(Randomness.Separated(a, b));
        Assert.False(Randomness.Separated(a, a with { Name = "a2" }));
        Assert.True(Randomness.Separated(a, small));
        Assert.False(Randomness.Separated(a, large));
        Assert.False(Randomness.Separated(small, large));   // two variables never separate
        Assert.True(Randomness.Separated(a, a with { Consumer = RandomConsumer.SplitMixState }));
        Assert.True(Randomness.Separated(a, a with { Parts = [KeyPart.Tag(7)] }));
    }

    /// <summary>The derivations give the bits the call sites computed inline before (the checkpoints on disk depend on them).</summary>
    [Theory]
    [InlineData(0L, 0L, 0L, 0L)]
    [InlineData(42L, 7L, 3L, 1234L)]
    [InlineData(-5L, 1L << 40, 99L, 59_999L)]
    public void DerivationsKeepTheirBits(long seed, long a, long b, long c)
    {
        Assert.Equal(SeedMix.Mix(seed, a, b, c), Randomness.TrainingSample(seed, a, b, c));
        var key = (ulong)c * 0x9E3779B97F4A7C15UL;
        Assert.Equal(SeedMix.Mix(key, 3UL), Randomness.TrainingNoise(key));
        Assert.Equal(unchecked((long)SeedMix.Mix(seed, b)), Randomness.DropoutLayer(seed, b));
        Assert.Equal(unchecked((long)SeedMix.Mix(SeedMix.Mix(seed, 0xC1A55), 0)), Randomness.ClassifierInit(seed));
        Assert.Equal(SeedMix.Mix(SeedMix.Mix(seed, 0xC1A55), 3), Randomness.ClassifierEpochOrder(seed, 2));
        Assert.Equal(SeedMix.Mix(seed, a, 0x5A3D1E), Randomness.SamplingChain(seed, a));
        Assert.Equal(SeedMix.Mix(key, (ulong)(b + 1)), Randomness.SamplingStepNoise(key, (int)b));
        Assert.Equal(SeedMix.Mix(seed, a, 0x0E90C4), Randomness.EpochPermutation(seed, a));
        Assert.Equal(SeedMix.Mix(seed, a, (int)b), Randomness.BitsPerDimNoise(seed, a, (int)b));
        Assert.Equal((long)SeedMix.Mix(seed, a, 0xF100 + (int)b), Randomness.FloorDraw(seed, a, (int)b));
        Assert.Equal(SeedMix.Mix(seed, (int)b, 0x5D), Randomness.SlicedWassersteinDirection(seed, (int)b));
        Assert.Equal(unchecked((int)SeedMix.Mix(seed, a, 0x5EF1)), Randomness.VerifyDraw(seed, a));
        Assert.Equal((long)SeedMix.Mix(seed, 0L), Randomness.SyntheticSet(seed, Randomness.SyntheticTrainTag));
        Assert.Equal((long)SeedMix.Mix(seed, 1L), Randomness.SyntheticSet(seed, Randomness.SyntheticHeldOutTag));
        Assert.Equal(SeedMix.Mix(seed, 0x5B117), Randomness.SplitMixState(seed, (long)Randomness.SplitTag));
        Assert.Equal(seed, Randomness.WeightInit(seed));
    }

    /// <summary>Every derivation goes through <see cref="Randomness"/>, the coordinator's --verify draw included.</summary>
    [Fact]
    public void NoSourceMixesItsOwnStream()
    {
        var src = Repository.PathOf("src");
        var allowed = new[] { "Randomness.cs", "SeedMix.cs", "CounterRng.cs" };
        var offenders = Directory.EnumerateFiles(src, "*.cs", SearchOption.AllDirectories)
            .Where(f => !f.Contains($"{Path.DirectorySeparatorChar}obj{Path.DirectorySeparatorChar}", StringComparison.Ordinal))
            .Where(f => !allowed.Contains(Path.GetFileName(f)))
            .Where(f => File.ReadAllText(f).Contains("SeedMix.", StringComparison.Ordinal))
            .ToList();
        Assert.Empty(offenders);
        var driver = File.ReadAllText(Path.Combine(src, "Coordinator", "Training", "StepDriver.cs"));
        Assert.Contains("Randomness.VerifyDraw", driver, StringComparison.Ordinal);
    }

    private static (string, string) Pair(string a, string b) => string.CompareOrdinal(a, b) < 0 ? (a, b) : (b, a);
}
