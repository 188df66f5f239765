using System.Buffers.Binary;

namespace DistDiffusion.Fuzz.Targets;

/// <summary>
/// A small deterministic mutator for the seeded pass in tests/Fuzz (no AFL there): from a seeded random stream, each
/// mutant is a corpus input with one to four of AFL's havoc steps applied (bit flips, interesting values, arithmetic,
/// deletions, duplicated blocks, a splice with another input). The same seed gives the same mutants.
/// </summary>
public sealed class Mutator(int seed)
{
    private static readonly int[] Interesting = [0, 1, -1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, int.MaxValue, int.MinValue, 64 << 10, 1 << 20];
    private const int MaxLength = 1 << 20;
    private readonly Random _random = new(seed);

    public byte[] Mutate(IReadOnlyList<byte[]> corpus)
    {
        ArgumentNullException.ThrowIfNull(corpus);
        var bytes = new List<byte>(corpus[_random.Next(corpus.Count)]);
        var steps = 1 + _random.Next(4);
        for (var s = 0; s < steps; s++) Step(bytes, corpus);
        return [.. bytes.Take(MaxLength)];
    }

    private void Step(List<byte> b, IReadOnlyList<byte[]> corpus)
    {
        if (b.Count == 0)
        {
            b.Add((byte)_random.Next(256));
            return;
        }
        var at = _random.Next(b.Count);
        switch (_random.Next(9))
        {
            case 0:
                b[at] ^= (byte)(1 << _random.Next(8));
                break;
            case 1:
                b[at] = (byte)Interesting[_random.Next(Interesting.Length)];
                break;
            case 2:
                b[at] = (byte)(b[at] + _random.Next(-35, 36));
                break;
            case 3:
                if (at + 4 <= b.Count)
                {
                    Span<byte> word = stackalloc byte[4];
                    var value = Interesting[_random.Next(Interesting.Length)];
                    if (_random.Next(2) == 0) BinaryPrimitives.WriteInt32LittleEndian(word, value);
                    else BinaryPrimitives.WriteInt32BigEndian(word, value);
                    for (var i = 0; i < 4; i++) b[at + i] = word[i];
                }
                break;
            case 4:
                b.RemoveRange(at, Math.Min(b.Count - at, 1 + _random.Next(16)));
                break;
            case 5:
                var length = Math.Min(b.Count - at, 1 + _random.Next(32));
                b.InsertRange(_random.Next(b.Count + 1), b.GetRange(at, length));
                break;
            case 6:
                b.Insert(at, (byte)_random.Next(256));
                break;
            case 7:
                b[at] = (byte)_random.Next(256);
                break;
            default:
                var other = corpus[_random.Next(corpus.Count)];
                if (other.Length == 0) break;
                var from = _random.Next(other.Length);
                b.RemoveRange(at, b.Count - at);
                b.AddRange(other.AsSpan(from).ToArray());
                break;
        }
    }
}
