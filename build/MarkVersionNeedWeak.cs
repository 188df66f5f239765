// An MSBuild task (compiled by RoslynCodeTaskFactory from Directory.Build.targets): in each given ELF64 little-endian
// shared library, mark the version need named VersionName (an entry of .gnu.version_r, SHT_GNU_verneed) weak, so that
// glibc's loader accepts a dependency that lacks that version. Only the two bytes of that entry's vna_flags change.
// The file is rewritten through a temporary file and a rename, so a hard link to a package cache is replaced, never
// written through; its time stamp is kept, so the next incremental copy sees it as unchanged. A file whose entry is
// already weak, or that has no such entry, is left alone.
using System;
using System.IO;
using System.Text;
using Microsoft.Build.Framework;
using Microsoft.Build.Utilities;

public sealed class MarkVersionNeedWeak : Task
{
    [Required] public ITaskItem[] Files { get; set; } = Array.Empty<ITaskItem>();
    [Required] public string VersionName { get; set; } = "";

    private const uint ShtGnuVerneed = 0x6ffffffe;
    private const ushort VerFlgWeak = 0x2;

    public override bool Execute()
    {
        foreach (var item in Files)
        {
            var path = item.GetMetadata("FullPath");
            byte[] bytes = File.ReadAllBytes(path);
            string? error;
            long flagsOffset = FindFlags(bytes, VersionName, out error);
            if (error is not null)
            {
                Log.LogError("{0}: {1}", path, error);
                return false;
            }
            if (flagsOffset < 0)
            {
                Log.LogMessage(MessageImportance.Low, "{0}: no version need {1}; left as it is", path, VersionName);
                continue;
            }
            ushort flags = BitConverter.ToUInt16(bytes, (int)flagsOffset);
            if ((flags & VerFlgWeak) != 0) continue;
            flags |= VerFlgWeak;
            bytes[flagsOffset] = (byte)(flags & 0xff);
            bytes[flagsOffset + 1] = (byte)(flags >> 8);
            var stamp = File.GetLastWriteTimeUtc(path);
            var temporary = path + ".weak-need.tmp";
            File.WriteAllBytes(temporary, bytes);
            File.SetLastWriteTimeUtc(temporary, stamp);
            File.Delete(path);   // unlinks a hard link to the package cache; the cache's file stays as it came
            File.Move(temporary, path);
            Log.LogMessage(MessageImportance.Normal, "{0}: version need {1} marked weak", path, VersionName);
        }
        return true;
    }

    /// <summary>The file offset of the vna_flags of the named need; -1 where there is none; error set where the file is not what we read.</summary>
    private static long FindFlags(byte[] b, string name, out string? error)
    {
        error = null;
        if (b.Length < 64 || b[0] != 0x7f || b[1] != (byte)'E' || b[2] != (byte)'L' || b[3] != (byte)'F')
        {
            error = "not an ELF file";
            return -1;
        }
        if (b[4] != 2 || b[5] != 1)
        {
            error = $"ELF class {b[4]}, data {b[5]}: expected 64-bit little-endian (2, 1)";
            return -1;
        }
        long shoff = (long)BitConverter.ToUInt64(b, 0x28);
        int shentsize = BitConverter.ToUInt16(b, 0x3A), shnum = BitConverter.ToUInt16(b, 0x3C);
        if (shentsize < 64 || shoff <= 0 || shoff + (long)shnum * shentsize > b.Length)
        {
            error = $"section headers at {shoff} ({shnum} x {shentsize} bytes) do not fit the file of {b.Length} bytes";
            return -1;
        }
        for (int i = 0; i < shnum; i++)
        {
            long h = shoff + (long)i * shentsize;
            if (BitConverter.ToUInt32(b, (int)h + 4) != ShtGnuVerneed) continue;
            long offset = (long)BitConverter.ToUInt64(b, (int)h + 24);
            long size = (long)BitConverter.ToUInt64(b, (int)h + 32);
            int link = (int)BitConverter.ToUInt32(b, (int)h + 40);
            int count = (int)BitConverter.ToUInt32(b, (int)h + 44);
            if (link >= shnum || offset + size > b.Length)
            {
                error = $".gnu.version_r at {offset} (+{size}) or its string table {link} lies outside the file";
                return -1;
            }
            long strings = (long)BitConverter.ToUInt64(b, (int)(shoff + (long)link * shentsize + 24));
            long need = offset;
            for (int n = 0; n < count; n++)
            {
                if (need + 16 > offset + size) break;
                int auxCount = BitConverter.ToUInt16(b, (int)need + 2);
                long aux = need + BitConverter.ToUInt32(b, (int)need + 8);
                for (int a = 0; a < auxCount; a++)
                {
                    if (aux + 16 > offset + size) break;
                    long nameAt = strings + BitConverter.ToUInt32(b, (int)aux + 8);
                    if (nameAt < b.Length && CString(b, nameAt) == name) return aux + 4;
                    uint next = BitConverter.ToUInt32(b, (int)aux + 12);
                    if (next == 0) break;
                    aux += next;
                }
                uint nextNeed = BitConverter.ToUInt32(b, (int)need + 12);
                if (nextNeed == 0) break;
                need += nextNeed;
            }
        }
        return -1;
    }

    private static string CString(byte[] b, long at)
    {
        long end = at;
        while (end < b.Length && b[end] != 0) end++;
        return Encoding.ASCII.GetString(b, (int)at, (int)(end - at));
    }
}
