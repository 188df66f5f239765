using System.Text;
using DistDiffusion.Model.Imaging;
using TorchSharp;

namespace DistDiffusion.Tests.Imaging;

public class NpyTests
{
    [Fact]
    public void FloatRoundTripWithHandCheckedHeader()
    {
        using var tmp = new TempFolder();
        using var t = torch.tensor(new float[] { 1.5f, -2f, 0f, 3.25f, float.MaxValue, -0.125f }, [3, 2]);
        var path = tmp.File("a.npy");
        Npy.Write(path, t);
        var bytes = File.ReadAllBytes(path);
        Assert.Equal(new byte[] { 0x93, (byte)'N', (byte)'U', (byte)'M', (byte)'P', (byte)'Y', 1, 0 }, bytes[..8]);
        var headerLen = bytes[8] | bytes[9] << 8;
        Assert.Equal(0, (10 + headerLen) % 64);
        Assert.Equal(128, 10 + headerLen); // 71 bytes unpadded -> next multiple of 64, as NumPy writes it
        var header = Encoding.ASCII.GetString(bytes, 10, headerLen);
        Assert.StartsWith("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }", header, StringComparison.Ordinal);
        Assert.EndsWith("\n", header, StringComparison.Ordinal);
        Assert.Equal(128 + 6 * 4, bytes.Length);
        Assert.Equal(BitConverter.GetBytes(1.5f), bytes[128..132]);

        using var back = Npy.Read(path);
        Assert.Equal([3L, 2], back.shape);
        Assert.Equal(torch.ScalarType.Float32, back.dtype);
        Assert.Equal(t.data<float>().ToArray(), back.data<float>().ToArray());
    }

    [Fact]
    public void Int64AndOneDimensionalRoundTrip()
    {
        using var tmp = new TempFolder();
        using var t = torch.tensor(new long[] { 7, -1, long.MaxValue });
        Npy.Write(tmp.File("l.npy"), t);
        var header = Encoding.ASCII.GetString(File.ReadAllBytes(tmp.File("l.npy")), 10, 118);
        Assert.Contains("'descr': '<i8'", header, StringComparison.Ordinal);
        Assert.Contains("'shape': (3,)", header, StringComparison.Ordinal);
        using var back = Npy.Read(tmp.File("l.npy"));
        Assert.Equal(torch.ScalarType.Int64, back.dtype);
        Assert.Equal([7L, -1, long.MaxValue], back.data<long>().ToArray());

        using var img = torch.rand(2, 1, 5, 5);
        Npy.Write(tmp.File("img.npy"), img);
        using var img2 = Npy.Read(tmp.File("img.npy"));
        Assert.Equal(img.data<float>().ToArray(), img2.data<float>().ToArray());
        Assert.Throws<ArgumentException>(() => Npy.Write(tmp.File("d.npy"), torch.zeros(2, dtype: torch.ScalarType.Float64)));
    }

    [Fact]
    public void MalformedFilesAreRejectedNamingTheFile()
    {
        using var tmp = new TempFolder();
        using var t = torch.ones(4, 2);
        var good = tmp.File("good.npy");
        Npy.Write(good, t);
        var bytes = File.ReadAllBytes(good);

        void Expect(string name, byte[] content, string fragment)
        {
            var p = tmp.File(name);
            File.WriteAllBytes(p, content);
            var e = Assert.Throws<InvalidDataException>(() => Npy.Read(p));
            Assert.Contains(p, e.Message, StringComparison.Ordinal);
            Assert.Contains(fragment, e.Message, StringComparison.Ordinal);
        }

        Expect("short.npy", bytes[..^4], "expected 32 bytes of data");
        Expect("long.npy", [.. bytes, 0, 0, 0, 0], "got 36");
        var magic = (byte[])bytes.Clone(); magic[1] = (byte)'X';
        Expect("magic.npy", magic, "magic");
        var f8 = (byte[])bytes.Clone(); Encoding.ASCII.GetBytes("<f8").CopyTo(f8, Encoding.ASCII.GetString(bytes).IndexOf("<f4", StringComparison.Ordinal));
        Expect("f8.npy", f8, "unsupported dtype '<f8'");
        var fortran = Encoding.Latin1.GetBytes(Encoding.Latin1.GetString(bytes).Replace("False", "True ", StringComparison.Ordinal));
        Expect("fortran.npy", fortran, "Fortran");
        var version = (byte[])bytes.Clone(); version[6] = 9;
        Expect("version.npy", version, "version 9.0");
    }
}
