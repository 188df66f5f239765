using System.Buffers.Binary;
using System.Text;

namespace DistDiffusion.Tests.Deploy;

/// <summary>
/// The symbol-version tables of an ELF64 little-endian shared library, read from its section headers: the version
/// needs (.gnu.version_r: which versions of which library it asks for, with their flags) and the version definitions
/// (.gnu.version_d: which versions it provides). Written for the tests apart from build/MarkVersionNeedWeak.cs, so the
/// two do not share a mistake.
/// </summary>
internal sealed class ElfVersions
{
    /// <summary>VER_FLG_WEAK: glibc's loader accepts a library without this version.</summary>
    public const ushort WeakFlag = 0x2;

    private const uint SectionVersionNeeds = 0x6ffffffe;        // SHT_GNU_verneed
    private const uint SectionVersionDefinitions = 0x6ffffffd;  // SHT_GNU_verdef

    /// <summary>One version need (a Vernaux entry): the library it names, the version, its flags and where they lie in the file.</summary>
    public sealed record Need(string File, string Version, ushort Flags, int FlagsOffset)
    {
        public bool Weak => (Flags & WeakFlag) != 0;
    }

    private ElfVersions(IReadOnlyList<Need> needs, IReadOnlyList<string> definitions)
    {
        Needs = needs;
        Definitions = definitions;
    }

    public IReadOnlyList<Need> Needs { get; }
    /// <summary>The versions the library defines (its soname's base entry included).</summary>
    public IReadOnlyList<string> Definitions { get; }

    public static ElfVersions Read(string path)
    {
        try
        {
            return Read(File.ReadAllBytes(path));
        }
        catch (InvalidDataException e)
        {
            throw new InvalidDataException($"{path}: {e.Message}", e);
        }
    }

    /// <exception cref="InvalidDataException">Not an ELF64 little-endian file, or a table that does not fit it.</exception>
    public static ElfVersions Read(byte[] elf)
    {
        if (elf.Length < 64 || elf[0] != 0x7f || elf[1] != 'E' || elf[2] != 'L' || elf[3] != 'F')
            throw new InvalidDataException("not an ELF file (no \\x7fELF magic)");
        if (elf[4] != 2 || elf[5] != 1)
            throw new InvalidDataException($"ELF class {elf[4]} and data encoding {elf[5]}: expected 2 (64-bit) and 1 (little-endian)");
        var sectionTable = checked((int)U64(elf, 0x28));
        int entrySize = U16(elf, 0x3A), count = U16(elf, 0x3C);
        if (entrySize < 64 || sectionTable <= 0 || (long)sectionTable + (long)count * entrySize > elf.Length)
            throw new InvalidDataException($"section header table at {sectionTable} ({count} entries of {entrySize} bytes) does not fit the {elf.Length}-byte file");

        var needs = new List<Need>();
        var definitions = new List<string>();
        for (var i = 0; i < count; i++)
        {
            var header = sectionTable + i * entrySize;
            var type = U32(elf, header + 4);
            if (type != SectionVersionNeeds && type != SectionVersionDefinitions) continue;
            var start = checked((int)U64(elf, header + 24));
            var size = checked((int)U64(elf, header + 32));
            var link = (int)U32(elf, header + 40);
            var entries = (int)U32(elf, header + 44);
            if (start < 0 || (long)start + size > elf.Length || link >= count)
                throw new InvalidDataException($"version section {i} ({start}+{size}, strings in section {link}) lies outside the file");
            var stringsHeader = sectionTable + link * entrySize;
            var strings = new Strings(elf, checked((int)U64(elf, stringsHeader + 24)), checked((int)U64(elf, stringsHeader + 32)));
            var end = start + size;
            if (type == SectionVersionNeeds) ReadNeeds(elf, start, end, entries, strings, needs);
            else ReadDefinitions(elf, start, end, entries, strings, definitions);
        }
        return new ElfVersions(needs, definitions);
    }

    private static void ReadNeeds(byte[] elf, int at, int end, int entries, Strings strings, List<Need> needs)
    {
        for (var n = 0; n < entries; n++)
        {
            Within(at, 16, end, "Verneed");
            int auxCount = U16(elf, at + 2);
            var file = strings.At(U32(elf, at + 4));
            var aux = at + (int)U32(elf, at + 8);
            for (var a = 0; a < auxCount; a++)
            {
                Within(aux, 16, end, "Vernaux");
                needs.Add(new Need(file, strings.At(U32(elf, aux + 8)), U16(elf, aux + 4), aux + 4));
                aux += (int)U32(elf, aux + 12);
            }
            var next = (int)U32(elf, at + 12);
            if (next == 0) break;
            at += next;
        }
    }

    private static void ReadDefinitions(byte[] elf, int at, int end, int entries, Strings strings, List<string> definitions)
    {
        for (var n = 0; n < entries; n++)
        {
            Within(at, 20, end, "Verdef");
            if (U16(elf, at + 6) > 0)
            {
                var aux = at + (int)U32(elf, at + 12);
                Within(aux, 8, end, "Verdaux");
                definitions.Add(strings.At(U32(elf, aux)));   // the first Verdaux names the version; the others its parents
            }
            var next = (int)U32(elf, at + 16);
            if (next == 0) break;
            at += next;
        }
    }

    private static void Within(int at, int length, int end, string what)
    {
        if (at < 0 || at + length > end) throw new InvalidDataException($"a {what} entry at {at} runs past its section's end {end}");
    }

    private static ushort U16(byte[] b, int at) => BinaryPrimitives.ReadUInt16LittleEndian(b.AsSpan(at, 2));
    private static uint U32(byte[] b, int at) => BinaryPrimitives.ReadUInt32LittleEndian(b.AsSpan(at, 4));
    private static ulong U64(byte[] b, int at) => BinaryPrimitives.ReadUInt64LittleEndian(b.AsSpan(at, 8));

    private sealed class Strings(byte[] elf, int start, int size)
    {
        public string At(uint offset)
        {
            if (offset >= size || start + (long)size > elf.Length) throw new InvalidDataException($"string {offset} lies outside its {size}-byte table at {start}");
            var from = start + (int)offset;
            var to = Array.IndexOf(elf, (byte)0, from, start + size - from);
            if (to < 0) throw new InvalidDataException($"string {offset} of the table at {start} has no terminating NUL");
            return Encoding.ASCII.GetString(elf, from, to - from);
        }
    }
}
