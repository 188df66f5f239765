using TorchSharp.Modules;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace DistDiffusion.Model.Networks;

// Building blocks of the two U-Net layouts. Shapes: x [B, C, H, W], temb [B, time_dim].
// Annotated layout: https://huggingface.co/blog/annotated-diffusion (after lucidrains/denoising-diffusion-pytorch).
// Ho2020 layout: Ho et al. (2020) diffusion_tf/models/unet.py, as ported in pesser/pytorch_diffusion/model.py.

/// <summary>
/// Conv2d with weight standardization (Qiao et al. 2019), annotated diffusion model:
/// w' = (w - mean_o(w)) / sqrt(var_o(w) + eps), statistics per output channel o (population variance).
/// </summary>
internal sealed class WeightStandardizedConv2d : nn.Module<Tensor, Tensor>
{
    private readonly Conv2d conv;
    private readonly long padding;

    public WeightStandardizedConv2d(long inChannels, long outChannels, long kernelSize, long padding)
        : base(nameof(WeightStandardizedConv2d))
    {
        conv = nn.Conv2d(inChannels, outChannels, kernelSize, padding: padding);
        this.padding = padding;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        var eps = x.dtype == ScalarType.Float32 ? 1e-5 : 1e-3;
        var weight = conv.weight!;                                      // [O, I, k, k]
        var dims = new long[] { 1, 2, 3 };
        var mean = weight.mean(dims, keepdim: true);                    // [O, 1, 1, 1]
        var centred = weight.sub(mean);
        var variance = centred.square().mean(dims, keepdim: true);      // [O, 1, 1, 1]
        var standardized = centred.mul(variance.add(eps).rsqrt());
        return F.conv2d(x, standardized, conv.bias, padding: new[] { padding, padding });
    }
}

/// <summary>Annotated <c>Block</c>: WS-conv 3x3 -> GroupNorm -> (h (scale + 1) + shift) -> SiLU -> dropout.</summary>
internal sealed class AnnotatedBlock : nn.Module
{
    private readonly WeightStandardizedConv2d proj;
    private readonly GroupNorm norm;
    private readonly nn.Module<Tensor, Tensor>? dropout;

    public AnnotatedBlock(long inChannels, long outChannels, long groups, SampleDropout? dropout)
        : base(nameof(AnnotatedBlock))
    {
        proj = new WeightStandardizedConv2d(inChannels, outChannels, 3, 1);
        norm = Norm.GroupNorm(groups, outChannels);
        this.dropout = dropout;
        RegisterComponents();
    }

    /// <param name="x">[B, C_in, H, W]</param>
    /// <param name="scale">[B, C_out, 1, 1] or null</param>
    /// <param name="shift">[B, C_out, 1, 1] or null</param>
    public Tensor Forward(Tensor x, Tensor? scale, Tensor? shift)
    {
        var h = norm.forward(proj.forward(x));
        if (scale is not null && shift is not null)
            h = h.mul(scale.add(1)).add(shift);
        h = F.silu(h);
        return dropout is null ? h : dropout.forward(h);
    }
}

/// <summary>
/// Annotated <c>ResnetBlock</c>: scale, shift = Linear(SiLU(temb)) -> [B, 2 C_out] chunked;
/// h = block2(block1(x, scale, shift)); out = h + res_conv(x) (1x1 conv when the widths differ).
/// Dropout sits in block1 (as in denoising-diffusion-pytorch).
/// </summary>
internal sealed class AnnotatedResnetBlock : nn.Module<Tensor, Tensor, Tensor>
{
    private readonly Linear mlp;
    private readonly AnnotatedBlock block1;
    private readonly AnnotatedBlock block2;
    private readonly nn.Module<Tensor, Tensor> res_conv;

    public AnnotatedResnetBlock(long inChannels, long outChannels, long timeDim, long groups, SampleDropout dropout)
        : base(nameof(AnnotatedResnetBlock))
    {
        mlp = nn.Linear(timeDim, 2 * outChannels);
        block1 = new AnnotatedBlock(inChannels, outChannels, groups, dropout);
        block2 = new AnnotatedBlock(outChannels, outChannels, groups, null);
        res_conv = inChannels != outChannels ? nn.Conv2d(inChannels, outChannels, 1) : nn.Identity();
        RegisterComponents();
    }

    public override Tensor forward(Tensor x, Tensor temb)
    {
        var ss = mlp.forward(F.silu(temb)).unsqueeze(-1).unsqueeze(-1).chunk(2, 1); // 2 x [B, C_out, 1, 1]
        var h = block1.Forward(x, ss[0], ss[1]);
        h = block2.Forward(h, null, null);
        return h.add(res_conv.forward(x));
    }
}

/// <summary>
/// Annotated <c>LinearAttention</c> (Shen et al. 2018 efficient attention): q softmaxed over features,
/// k over positions; context = k v^T [B, h, d, d]; out = context^T q; 1x1 conv and GroupNorm(1) out.
/// </summary>
internal sealed class LinearAttention : nn.Module<Tensor, Tensor>
{
    private readonly long heads;
    private readonly long headSize;
    private readonly Conv2d to_qkv;
    private readonly Conv2d to_out;
    private readonly GroupNorm to_out_norm;

    public LinearAttention(long channels, long heads, long headSize)
        : base(nameof(LinearAttention))
    {
        this.heads = heads;
        this.headSize = headSize;
        to_qkv = nn.Conv2d(channels, 3 * heads * headSize, 1, bias: false);
        to_out = nn.Conv2d(heads * headSize, channels, 1);
        to_out_norm = Norm.GroupNorm(1, channels);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        var (b, height, width) = (x.shape[0], x.shape[2], x.shape[3]);
        var qkv = to_qkv.forward(x).chunk(3, 1);                                        // 3 x [B, h d, H, W]
        var q = qkv[0].reshape(b, heads, headSize, height * width).softmax(-2);          // [B, h, d, N]
        var k = qkv[1].reshape(b, heads, headSize, height * width).softmax(-1);          // [B, h, d, N]
        var v = qkv[2].reshape(b, heads, headSize, height * width);                      // [B, h, e, N]
        q = q.mul(1.0 / Math.Sqrt(headSize));
        var context = k.matmul(v.transpose(-1, -2));                                     // [B, h, d, e]
        var output = context.transpose(-1, -2).matmul(q);                                // [B, h, e, N]
        output = output.reshape(b, heads * headSize, height, width);
        return to_out_norm.forward(to_out.forward(output));
    }
}

/// <summary>Annotated multi-head softmax self-attention over all H W positions (middle of the U-Net).</summary>
internal sealed class Attention : nn.Module<Tensor, Tensor>
{
    private readonly long heads;
    private readonly long headSize;
    private readonly Conv2d to_qkv;
    private readonly Conv2d to_out;

    public Attention(long channels, long heads, long headSize)
        : base(nameof(Attention))
    {
        this.heads = heads;
        this.headSize = headSize;
        to_qkv = nn.Conv2d(channels, 3 * heads * headSize, 1, bias: false);
        to_out = nn.Conv2d(heads * headSize, channels, 1);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        var (b, height, width) = (x.shape[0], x.shape[2], x.shape[3]);
        var qkv = to_qkv.forward(x).chunk(3, 1);                                        // 3 x [B, h d, H, W]
        var q = qkv[0].reshape(b, heads, headSize, height * width).mul(1.0 / Math.Sqrt(headSize));
        var k = qkv[1].reshape(b, heads, headSize, height * width);
        var v = qkv[2].reshape(b, heads, headSize, height * width);                      // [B, h, d, N]
        var sim = q.transpose(-1, -2).matmul(k);                                         // [B, h, N, N]
        sim = sim.sub(sim.amax(new long[] { -1 }, keepdim: true).detach());
        var attn = sim.softmax(-1);
        var output = attn.matmul(v.transpose(-1, -2));                                   // [B, h, N, d]
        output = output.transpose(-1, -2).reshape(b, heads * headSize, height, width);   // [B, h d, H, W]
        return to_out.forward(output);
    }
}

/// <summary>Annotated <c>PreNorm</c>: fn(GroupNorm(1, C)(x)).</summary>
internal sealed class PreNorm : nn.Module<Tensor, Tensor>
{
    private readonly GroupNorm norm;
    private readonly nn.Module<Tensor, Tensor> fn;

    public PreNorm(long channels, nn.Module<Tensor, Tensor> fn)
        : base(nameof(PreNorm))
    {
        norm = Norm.GroupNorm(1, channels);
        this.fn = fn;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => fn.forward(norm.forward(x));
}

/// <summary>Annotated <c>Residual</c>: fn(x) + x.</summary>
internal sealed class Residual : nn.Module<Tensor, Tensor>
{
    private readonly nn.Module<Tensor, Tensor> fn;

    public Residual(nn.Module<Tensor, Tensor> fn)
        : base(nameof(Residual))
    {
        this.fn = fn;
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => fn.forward(x).add(x);
}

/// <summary>Annotated <c>Downsample</c>: pixel-unshuffle 2x2 ([B, C, H, W] -> [B, 4C, H/2, W/2]) and a 1x1 conv.</summary>
internal sealed class AnnotatedDownsample : nn.Module<Tensor, Tensor>
{
    private readonly Conv2d conv;

    public AnnotatedDownsample(long inChannels, long outChannels)
        : base(nameof(AnnotatedDownsample))
    {
        conv = nn.Conv2d(4 * inChannels, outChannels, 1);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => conv.forward(F.pixel_unshuffle(x, 2));
}

/// <summary><c>Upsample</c> of both layouts: nearest-neighbour 2x then a 3x3 conv ([B, C, H, W] -> [B, C', 2H, 2W]).</summary>
internal sealed class Upsample : nn.Module<Tensor, Tensor>
{
    private static readonly double[] ScaleFactor = [2.0, 2.0];
    private readonly Conv2d conv;

    public Upsample(long inChannels, long outChannels)
        : base(nameof(Upsample))
    {
        conv = nn.Conv2d(inChannels, outChannels, 3, padding: 1);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) =>
        conv.forward(F.interpolate(x, scale_factor: ScaleFactor, mode: InterpolationMode.Nearest));
}

/// <summary>
/// Ho et al. <c>ResnetBlock</c>: h = conv1(swish(norm1(x))) + temb_proj(swish(temb)); h = conv2(dropout(swish(norm2(h))));
/// out = nin_shortcut(x) + h (1x1 conv shortcut when the widths differ). GroupNorm eps 1e-6.
/// </summary>
internal sealed class HoResnetBlock : nn.Module<Tensor, Tensor, Tensor>
{
    private readonly GroupNorm norm1;
    private readonly Conv2d conv1;
    private readonly Linear temb_proj;
    private readonly GroupNorm norm2;
    private readonly SampleDropout dropout;
    private readonly Conv2d conv2;
    private readonly nn.Module<Tensor, Tensor> nin_shortcut;

    public HoResnetBlock(long inChannels, long outChannels, long tembChannels, long groups, SampleDropout dropout)
        : base(nameof(HoResnetBlock))
    {
        norm1 = Norm.GroupNorm(groups, inChannels, eps: 1e-6);
        conv1 = nn.Conv2d(inChannels, outChannels, 3, padding: 1);
        temb_proj = nn.Linear(tembChannels, outChannels);
        norm2 = Norm.GroupNorm(groups, outChannels, eps: 1e-6);
        this.dropout = dropout;
        conv2 = nn.Conv2d(outChannels, outChannels, 3, padding: 1);
        nin_shortcut = inChannels != outChannels ? nn.Conv2d(inChannels, outChannels, 1) : nn.Identity();
        RegisterComponents();
    }

    public override Tensor forward(Tensor x, Tensor temb)
    {
        var h = conv1.forward(F.silu(norm1.forward(x)));                                 // [B, C_out, H, W]
        h = h.add(temb_proj.forward(F.silu(temb)).unsqueeze(-1).unsqueeze(-1));          // + [B, C_out, 1, 1]
        h = conv2.forward(dropout.forward(F.silu(norm2.forward(h))));
        return nin_shortcut.forward(x).add(h);
    }
}

/// <summary>Ho et al. <c>AttnBlock</c>: single-head self-attention with 1x1 q/k/v/proj convs, residual.</summary>
internal sealed class HoAttnBlock : nn.Module<Tensor, Tensor>
{
    private readonly GroupNorm norm;
    private readonly Conv2d q;
    private readonly Conv2d k;
    private readonly Conv2d v;
    private readonly Conv2d proj_out;

    public HoAttnBlock(long channels, long groups)
        : base(nameof(HoAttnBlock))
    {
        norm = Norm.GroupNorm(groups, channels, eps: 1e-6);
        q = nn.Conv2d(channels, channels, 1);
        k = nn.Conv2d(channels, channels, 1);
        v = nn.Conv2d(channels, channels, 1);
        proj_out = nn.Conv2d(channels, channels, 1);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x)
    {
        var (b, c, height, width) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
        var h = norm.forward(x);
        var query = q.forward(h).reshape(b, c, height * width).transpose(1, 2);          // [B, N, C]
        var key = k.forward(h).reshape(b, c, height * width);                            // [B, C, N]
        var value = v.forward(h).reshape(b, c, height * width);                          // [B, C, N]
        var weights = query.bmm(key).mul(1.0 / Math.Sqrt(c)).softmax(2);                 // [B, N_q, N_k]
        var output = value.bmm(weights.transpose(1, 2)).reshape(b, c, height, width);    // [B, C, H, W]
        return x.add(proj_out.forward(output));
    }
}

/// <summary>Ho et al. <c>Downsample</c> with conv: pad right/bottom by 1, 3x3 conv stride 2 ([B, C, H, W] -> [B, C, H/2, W/2]).</summary>
internal sealed class HoDownsample : nn.Module<Tensor, Tensor>
{
    private readonly Conv2d conv;

    public HoDownsample(long channels)
        : base(nameof(HoDownsample))
    {
        conv = nn.Conv2d(channels, channels, 3, stride: 2);
        RegisterComponents();
    }

    public override Tensor forward(Tensor x) => conv.forward(F.pad(x, new long[] { 0, 1, 0, 1 }));
}

/// <summary>GroupNorm (Wu &amp; He 2018) with the affine parameters set to PyTorch's defaults (weight 1, bias 0).</summary>
internal static class Norm
{
    /// <summary>
    /// nn.GroupNorm with weight = 1, bias = 0. TorchSharp 0.107's GroupNorm leaves its affine parameters
    /// uninitialized (torch.empty), which gave garbage / NaN outputs; they are filled explicitly here.
    /// </summary>
    public static GroupNorm GroupNorm(long groups, long channels, double eps = 1e-5)
    {
        var norm = nn.GroupNorm(groups, channels, eps: eps);
        using (no_grad())
        {
            norm.weight!.fill_(1.0);
            norm.bias!.zero_();
        }
        return norm;
    }
}
