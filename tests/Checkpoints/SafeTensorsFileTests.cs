using System.Buffers.Binary;
using System.ComponentModel;
using System.Diagnostics;
using System.Text;
using System.Text.Json;
using DistDiffusion.Model.Checkpoints;
using TorchSharp;
using static TorchSharp.torch;

namespace DistDiffusion.Tests.Checkpoints;

public sealed class SafeTensorsFileTests : IDisposable
{
    private readonly TempFolder _dir = new("distdiffusion-ckpt");

    public void Dispose() => _dir.Dispose();

    /// <summary>One tensor of every supported dtype, with awkward shapes (scalar, empty, 3-D, non-contiguous).</summary>
    private static Dictionary<string, Tensor> EveryDtype()
    {
        var floats = new float[] { 0f, -0f, 1.5f, -3.25f, 1e-30f, 3.4e38f, float.Epsilon, float.PositiveInfinity };
        return new Dictionary<string, Tensor>
        {
            ["f32"] = torch.tensor(floats, new long[] { 2, 4 }),
            ["f64"] = torch.tensor(new double[] { Math.PI, -Math.E, 1e-300, double.MaxValue, 0.1, 42 }, new long[] { 2, 3 }),
            ["f16"] = torch.tensor(new float[] { 0.5f, -1f, 65504f, 6.1e-5f, 1f / 3 }).to(ScalarType.Float16),
            ["bf16"] = torch.tensor(new float[] { 0.5f, -1f, 3e38f, 1e-38f, 1f / 3, 7f }).to(ScalarType.BFloat16),
            ["i64"] = torch.tensor(new long[] { long.MinValue, -1, 0, 1, long.MaxValue }),
            ["i32"] = torch.tensor(new int[] { int.MinValue, -7, 0, 7, int.MaxValue, 12345678 }, new long[] { 3, 2 }),
            ["u8"] = torch.arange(0, 256, dtype: ScalarType.Byte).reshape(2, 2, 64),
            ["bool"] = torch.tensor(new bool[] { true, false, false, true, true }),
            ["scalar"] = torch.tensor(2.75f),
            ["empty"] = torch.zeros(new long[] { 0, 3 }, ScalarType.Float32),
            ["transposed"] = torch.arange(0, 12, dtype: ScalarType.Float32).reshape(3, 4).t(),
        };
    }

    [Fact]
    public void RoundTripsEveryDtypeBitExactWithMetadata()
    {
        var tensors = EveryDtype();
        var metadata = new Dictionary<string, string> { ["format"] = "pt", ["note"] = "héllo \"quoted\" ✓" };
        try
        {
            var path = _dir.File("all.safetensors");
            SafeTensorsFile.Write(path, tensors, metadata);
            var (read, readMetadata) = SafeTensorsFile.Read(path);
            try
            {
                TensorAssert.BitEqual(tensors, read, "Read");
                Assert.Equal(metadata.OrderBy(kv => kv.Key), readMetadata.OrderBy(kv => kv.Key));
                Assert.True(tensors["transposed"].allclose(read["transposed"], rtol: 0, atol: 0));
                Assert.True(read["transposed"].is_contiguous());
            }
            finally { TensorAssert.DisposeAll(read.Values); }

            // The in-memory path gives the same bytes and the same tensors.
            var bytes = SafeTensorsFile.Serialize(tensors, metadata);
            Assert.Equal(File.ReadAllBytes(path), bytes);
            var (fromBytes, fromBytesMetadata) = SafeTensorsFile.Deserialize(bytes, "memory");
            try
            {
                TensorAssert.BitEqual(tensors, fromBytes, "Deserialize");
                Assert.Equal(metadata.OrderBy(kv => kv.Key), fromBytesMetadata.OrderBy(kv => kv.Key));
            }
            finally { TensorAssert.DisposeAll(fromBytes.Values); }
        }
        finally { TensorAssert.DisposeAll(tensors.Values); }
    }

    [Fact]
    public void ParametersThatRequireGradAreWritten()
    {
        using var p = torch.nn.Parameter(torch.tensor(new float[] { 1, 2, 3 }));
        var (read, meta) = SafeTensorsFile.Deserialize(SafeTensorsFile.Serialize(new Dictionary<string, Tensor> { ["w"] = p }), "memory");
        using var w = read["w"];
        Assert.Empty(meta);
        Assert.False(w.requires_grad);
        TensorAssert.BitEqual(p, w, "w");
    }

    [Fact]
    public void UnsupportedDtypeIsRejectedOnWrite()
    {
        using var t = torch.zeros(2, dtype: ScalarType.Int16);
        var e = Assert.Throws<ArgumentException>(() => SafeTensorsFile.Serialize(new Dictionary<string, Tensor> { ["x"] = t }));
        Assert.Contains("Int16", e.Message);
        Assert.False(File.Exists(_dir.File("x.safetensors")));
    }

    [Fact]
    public void WriteNeverOverwritesAnExistingFile()
    {
        using var t = torch.ones(2);
        var path = _dir.File("x.safetensors");
        File.WriteAllText(path, "keep");
        Assert.Throws<IOException>(() => SafeTensorsFile.Write(path, new Dictionary<string, Tensor> { ["x"] = t }));
        Assert.Equal("keep", File.ReadAllText(path));
    }

    /// <summary>The exact bytes of a tiny file, computed by hand from the specification.</summary>
    [Fact]
    public void TinyFileMatchesHandComputedBytes()
    {
        using var a = torch.tensor(new float[] { 1f, -2f });
        using var b = torch.tensor(new int[] { 7 });
        // Inserted out of order: the file must list and lay out tensors in sorted-name order.
        var bytes = SafeTensorsFile.Serialize(
            new Dictionary<string, Tensor> { ["b"] = b, ["a"] = a },
            new Dictionary<string, string> { ["k"] = "v" });

        const string json = """{"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"I32","shape":[1],"data_offsets":[8,12]}}""";
        Assert.Equal(133, json.Length);
        var expected = new List<byte>();
        expected.AddRange(new byte[] { 136, 0, 0, 0, 0, 0, 0, 0 });          // header length: 133 + 3 spaces of padding
        expected.AddRange(Encoding.UTF8.GetBytes(json));
        expected.AddRange("   "u8.ToArray());
        expected.AddRange(new byte[] { 0x00, 0x00, 0x80, 0x3F });            // 1.0f
        expected.AddRange(new byte[] { 0x00, 0x00, 0x00, 0xC0 });            // -2.0f
        expected.AddRange(new byte[] { 0x07, 0x00, 0x00, 0x00 });            // 7
        Assert.Equal(156, expected.Count);
        Assert.Equal(Convert.ToHexString(expected.ToArray()), Convert.ToHexString(bytes));
    }

    [Fact]
    public void HeaderWithoutMetadataIsPaddedToMultipleOf8()
    {
        using var t = torch.zeros(3, dtype: ScalarType.Byte);
        var bytes = SafeTensorsFile.Serialize(new Dictionary<string, Tensor> { ["x"] = t });
        const string json = """{"x":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}""";
        var n = (int)BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        Assert.Equal(0, n % 8);
        Assert.Equal(json + new string(' ', n - json.Length), Encoding.UTF8.GetString(bytes, 8, n));
        Assert.Equal(8 + n + 3, bytes.Length);
    }

    /// <summary>A stdlib-only Python reader (struct + json) must agree with what we wrote.</summary>
    [Fact]
    public async Task PythonStdlibReaderAgrees()
    {
        var tensors = EveryDtype();
        var path = _dir.File("py.safetensors");
        try
        {
            SafeTensorsFile.Write(path, tensors, new Dictionary<string, string> { ["format"] = "pt" });
        }
        finally { TensorAssert.DisposeAll(tensors.Values); }

        const string script = """
            import json, struct, sys
            sizes = {"F32": 4, "F64": 8, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}
            data = open(sys.argv[1], "rb").read()
            (n,) = struct.unpack("<Q", data[:8])
            assert n % 8 == 0, "header length %d not a multiple of 8" % n
            header = json.loads(data[8:8 + n].decode("utf-8"))
            meta = header.pop("__metadata__")
            assert meta == {"format": "pt"}, meta
            buf = data[8 + n:]
            pos = 0
            for name in sorted(header):
                info = header[name]
                b, e = info["data_offsets"]
                assert b == pos, "%s begins at %d, expected %d" % (name, b, pos)
                count = 1
                for d in info["shape"]:
                    count *= d
                assert e - b == count * sizes[info["dtype"]], name
                pos = e
            assert pos == len(buf), "data covers %d of %d bytes" % (pos, len(buf))
            f32 = header["f32"]
            vals = struct.unpack("<8f", buf[f32["data_offsets"][0]:f32["data_offsets"][1]])
            i64 = header["i64"]
            longs = struct.unpack("<5q", buf[i64["data_offsets"][0]:i64["data_offsets"][1]])
            tr = header["transposed"]
            trv = struct.unpack("<12f", buf[tr["data_offsets"][0]:tr["data_offsets"][1]])
            print(json.dumps({"shapes": {k: header[k]["shape"] for k in sorted(header)},
                              "dtypes": {k: header[k]["dtype"] for k in sorted(header)},
                              "f32": [vals[2], vals[3]], "i64": list(longs), "transposed": list(trv)}))
            """;
        var scriptPath = _dir.File("check.py");
        File.WriteAllText(scriptPath, script);
        var psi = new ProcessStartInfo("python3") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(scriptPath);
        psi.ArgumentList.Add(path);
        Process process;
        try
        {
            process = Process.Start(psi) ?? throw new InvalidOperationException("Process.Start returned null");
        }
        catch (Win32Exception e)
        {
            Assert.Fail($"python3 is required for the safetensors compatibility check but could not be started ({e.Message}); install python3 and put it on PATH");
            return;
        }
        using (process)
        {
            var stdout = process.StandardOutput.ReadToEndAsync();
            var stderr = process.StandardError.ReadToEndAsync();
            using var timeout = new CancellationTokenSource(TimeSpan.FromSeconds(30));
            await process.WaitForExitAsync(timeout.Token);
            var output = await stdout;
            var errors = await stderr;
            Assert.True(process.ExitCode == 0, $"python3 reader failed (exit {process.ExitCode}): {errors}");
            using var doc = JsonDocument.Parse(output);
            var root = doc.RootElement;
            Assert.Equal("[2,4]", root.GetProperty("shapes").GetProperty("f32").GetRawText().Replace(" ", ""));
            Assert.Equal("[]", root.GetProperty("shapes").GetProperty("scalar").GetRawText());
            Assert.Equal("[0,3]", root.GetProperty("shapes").GetProperty("empty").GetRawText().Replace(" ", ""));
            Assert.Equal("[4,3]", root.GetProperty("shapes").GetProperty("transposed").GetRawText().Replace(" ", ""));
            Assert.Equal("BF16", root.GetProperty("dtypes").GetProperty("bf16").GetString());
            Assert.Equal("BOOL", root.GetProperty("dtypes").GetProperty("bool").GetString());
            Assert.Equal(1.5, root.GetProperty("f32")[0].GetDouble());
            Assert.Equal(-3.25, root.GetProperty("f32")[1].GetDouble());
            Assert.Equal(long.MinValue, root.GetProperty("i64")[0].GetInt64());
            Assert.Equal(long.MaxValue, root.GetProperty("i64")[4].GetInt64());
            // The transpose of arange(12).reshape(3, 4) laid out row-major.
            var transposed = root.GetProperty("transposed").EnumerateArray().Select(v => v.GetDouble()).ToArray();
            Assert.Equal(new double[] { 0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11 }, transposed);
        }
    }

    // ---------------------------------------------------------------- validation

    /// <summary>A file from a header text and a data buffer of <paramref name="dataBytes"/> zero bytes.</summary>
    private static byte[] Build(string header, int dataBytes, ulong? declaredLength = null)
    {
        var h = Encoding.UTF8.GetBytes(header);
        var bytes = new byte[8 + h.Length + dataBytes];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, declaredLength ?? (ulong)h.Length);
        h.CopyTo(bytes, 8);
        return bytes;
    }

    private static string One(string name, string dtype, string shape, string offsets) =>
        $"\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape},\"data_offsets\":{offsets}}}";

    public static TheoryData<string, byte[], string> InvalidFiles() => new()
    {
        { "shorter than 8 bytes", new byte[] { 1, 2, 3 }, "shorter than the 8-byte" },
        { "empty file", [], "truncated" },
        { "header beyond file", Build("{}", 0, declaredLength: 1000), "beyond the end of the file" },
        { "header over 100 MB", Build("{}", 0, declaredLength: 200UL * 1024 * 1024), "exceeds the 104857600-byte limit" },
        { "huge u64 header length", Build("{}", 0, declaredLength: ulong.MaxValue), "exceeds" },
        { "not JSON", Build("{\"a\": ", 0), "not valid JSON" },
        { "not an object", Build("[1, 2]", 0), "expected an object" },
        { "entry not an object", Build("{\"a\": 3}", 0), "expected an object" },
        { "unknown dtype", Build("{" + One("a", "Q4", "[1]", "[0,1]") + "}", 1), "unknown dtype 'Q4'" },
        { "missing dtype", Build("{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4), "'dtype'" },
        { "negative dimension", Build("{" + One("a", "F32", "[2,-1]", "[0,0]") + "}", 0), "negative dimension" },
        { "fractional dimension", Build("{" + One("a", "F32", "[1.5]", "[0,4]") + "}", 4), "expected integers" },
        { "three offsets", Build("{" + One("a", "F32", "[1]", "[0,4,8]") + "}", 8), "expected [begin, end]" },
        { "end before begin", Build("{" + One("a", "U8", "[0]", "[4,0]") + "}", 4), "0 <= begin <= end" },
        { "negative begin", Build("{" + One("a", "U8", "[1]", "[-1,0]") + "}", 0), "0 <= begin <= end" },
        { "length != shape x dtype", Build("{" + One("a", "F32", "[2]", "[0,4]") + "}", 4), "does not match shape [2] x F32 = 8 bytes" },
        { "overlap", Build("{" + One("a", "F32", "[2]", "[0,8]") + "," + One("b", "F32", "[1]", "[4,8]") + "}", 8), "overlap" },
        { "gap", Build("{" + One("a", "F32", "[1]", "[0,4]") + "," + One("b", "F32", "[1]", "[8,12]") + "}", 12), "gap of 4 bytes" },
        { "gap at start", Build("{" + One("a", "F32", "[1]", "[4,8]") + "}", 8), "gap" },
        { "trailing bytes", Build("{" + One("a", "F32", "[1]", "[0,4]") + "}", 6), "2 unaccounted for" },
        { "data truncated", Build("{" + One("a", "F32", "[2]", "[0,8]") + "}", 5), "truncated" },
        { "duplicate names", Build("{" + One("a", "F32", "[1]", "[0,4]") + "," + One("a", "F32", "[1]", "[4,8]") + "}", 8), "duplicate name 'a'" },
        { "metadata not strings", Build("{\"__metadata__\":{\"k\":1}}", 0), "expected a string" },
    };

    [Theory]
    [MemberData(nameof(InvalidFiles))]
    public void InvalidFileIsRejectedNamingTheFile(string @case, byte[] bytes, string problem)
    {
        var e1 = Assert.Throws<InvalidDataException>(() => SafeTensorsFile.Deserialize(bytes, "source-name.safetensors"));
        Assert.StartsWith("source-name.safetensors: ", e1.Message, StringComparison.Ordinal);
        Assert.Contains(problem, e1.Message, StringComparison.Ordinal);

        var path = _dir.File(@case.Replace(' ', '_') + ".safetensors");
        File.WriteAllBytes(path, bytes);
        var e2 = Assert.Throws<InvalidDataException>(() => SafeTensorsFile.Read(path));
        Assert.StartsWith(path + ": ", e2.Message, StringComparison.Ordinal);
        Assert.Contains(problem, e2.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void ValidHandWrittenFileIsAccepted()
    {
        // The counterpart of the rejection cases: zero-length tensors and unsorted header entries are fine.
        var bytes = Build("{" + One("z", "F32", "[0]", "[4,4]") + "," + One("b", "I32", "[1]", "[0,4]") + "}", 4);
        bytes[^4] = 9;
        var (tensors, metadata) = SafeTensorsFile.Deserialize(bytes, "ok");
        using var b = tensors["b"];
        using var z = tensors["z"];
        Assert.Empty(metadata);
        Assert.Equal(9, b.item<int>());
        Assert.Equal(new long[] { 0 }, z.shape);
    }
}
