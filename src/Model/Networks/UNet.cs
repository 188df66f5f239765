using TorchSharp.Modules;
using static TorchSharp.torch;
using F = TorchSharp.torch.nn.functional;

namespace DistDiffusion.Model.Networks;

/// <summary>
/// U-Net denoiser for images [B, C, H, W] in one of two layouts (<see cref="UNetLayout"/>):
/// the annotated diffusion model's U-Net or Ho et al. (2020)'s CIFAR-10 network. Output [B, C, H, W],
/// or [B, 2C, H, W] with a learned variance. H and W must be divisible by 2^(stages - 1).
/// </summary>
public sealed class UNet : DenoiserNetwork
{
    private readonly nn.Module<Tensor, Tensor, Tensor?, Tensor> body;
    private readonly Embedding? class_emb;

    internal UNet(UNetOptions options, double dropoutRate, long[] dataShape, bool learnedVariance, int classes)
        : base(nameof(UNet), dataShape, learnedVariance, dropoutRate, classes)
    {
        Layout = options.UNetLayout;
        var outChannels = learnedVariance ? 2 * dataShape[0] : dataShape[0];
        body = Layout switch
        {
            UNetLayout.Annotated => new AnnotatedUNet(options, dataShape[0], outChannels, NewDropout),
            UNetLayout.Ho2020 => new Ho2020UNet(options, dataShape[0], dataShape[1], outChannels, NewDropout),
            _ => throw new ArgumentException($"recipe field 'u-net-layout' = {Layout}: expected annotated or ho2020"),
        };
        // Created after the body, so an unconditional network's initial weights are the same as before conditioning existed.
        // Row Classes is the "no label" token (classifier-free guidance's unconditional model); both layouts' time embedding is 4 x base-channels.
        if (classes > 0) class_emb = nn.Embedding(classes + 1, 4L * options.BaseChannels);
        RegisterComponents();
    }

    public UNetLayout Layout { get; }

    /// <summary>labels [B] -> an embedding [B, 4 base-channels] added to the time embedding (as diffusers' class_embedding).</summary>
    private protected override Tensor Denoise(Tensor x, Tensor t, Tensor? labels) =>
        body.forward(x, t, labels is null ? null : class_emb!.forward(labels));
}

/// <summary>One resolution stage of the annotated U-Net: ResBlocks ResNet blocks, Residual(PreNorm(LinearAttention)), a resampler.</summary>
internal sealed class AnnotatedStage : nn.Module
{
    public readonly ModuleList<AnnotatedResnetBlock> blocks;
    public readonly Residual attn;
    public readonly nn.Module<Tensor, Tensor> resample;

    public AnnotatedStage(IEnumerable<AnnotatedResnetBlock> blocks, Residual attn, nn.Module<Tensor, Tensor> resample)
        : base(nameof(AnnotatedStage))
    {
        this.blocks = new ModuleList<AnnotatedResnetBlock>(blocks.ToArray());
        this.attn = attn;
        this.resample = resample;
        RegisterComponents();
    }
}

/// <summary>
/// The U-Net of the annotated diffusion model (https://huggingface.co/blog/annotated-diffusion, class <c>Unet</c>),
/// dim = BaseChannels, dim_mults = ChannelMultipliers, resnet_block_groups = GroupNormGroups.
/// The blog has two ResNet blocks per stage; here there are ResBlocks, each leaving a skip connection
/// (the last one after the stage's linear attention) that the mirrored up block concatenates.
/// </summary>
internal sealed class AnnotatedUNet : nn.Module<Tensor, Tensor, Tensor?, Tensor>
{
    private readonly long dim;
    private readonly Conv2d init_conv;
    private readonly Linear time_mlp1;
    private readonly Linear time_mlp2;
    private readonly ModuleList<AnnotatedStage> downs;
    private readonly AnnotatedResnetBlock mid_block1;
    private readonly Residual mid_attn;
    private readonly AnnotatedResnetBlock mid_block2;
    private readonly ModuleList<AnnotatedStage> ups;
    private readonly AnnotatedResnetBlock final_res_block;
    private readonly Conv2d final_conv;

    public AnnotatedUNet(UNetOptions options, long inChannels, long outChannels, Func<SampleDropout> newDropout)
        : base(nameof(AnnotatedUNet))
    {
        dim = options.BaseChannels;
        long groups = options.GroupNormGroups, heads = options.AttentionHeads, headSize = options.AttentionHeadSize;
        var timeDim = 4 * dim;
        init_conv = nn.Conv2d(inChannels, dim, 1);
        time_mlp1 = nn.Linear(dim, timeDim);
        time_mlp2 = nn.Linear(timeDim, timeDim);

        // dims = [init_dim, dim * m for m in dim_mults]; in_out = consecutive pairs.
        var dims = new[] { dim }.Concat(options.ChannelMultipliers.Select(m => dim * m)).ToArray();
        var inOut = dims.Zip(dims.Skip(1)).ToArray();
        AnnotatedResnetBlock Block(long i, long o) => new(i, o, timeDim, groups, newDropout());

        downs = new ModuleList<AnnotatedStage>();
        for (var s = 0; s < inOut.Length; s++)
        {
            var (dimIn, dimOut) = inOut[s];
            var last = s == inOut.Length - 1;
            downs.Add(new AnnotatedStage(
                Enumerable.Range(0, options.ResBlocks).Select(_ => Block(dimIn, dimIn)).ToArray(),
                new Residual(new PreNorm(dimIn, new LinearAttention(dimIn, heads, headSize))),
                last ? nn.Conv2d(dimIn, dimOut, 3, padding: 1) : new AnnotatedDownsample(dimIn, dimOut)));
        }
        var midDim = dims[^1];
        mid_block1 = Block(midDim, midDim);
        mid_attn = new Residual(new PreNorm(midDim, new Attention(midDim, heads, headSize)));
        mid_block2 = Block(midDim, midDim);
        ups = new ModuleList<AnnotatedStage>();
        for (var s = 0; s < inOut.Length; s++)
        {
            var (dimIn, dimOut) = inOut[inOut.Length - 1 - s];
            var last = s == inOut.Length - 1;
            ups.Add(new AnnotatedStage(
                Enumerable.Range(0, options.ResBlocks).Select(_ => Block(dimOut + dimIn, dimOut)).ToArray(),
                new Residual(new PreNorm(dimOut, new LinearAttention(dimOut, heads, headSize))),
                last ? nn.Conv2d(dimOut, dimIn, 3, padding: 1) : new Upsample(dimOut, dimIn)));
        }
        final_res_block = Block(2 * dim, dim);
        final_conv = nn.Conv2d(dim, outChannels, 1);
        RegisterComponents();
    }

    /// <param name="classEmbedding">[B, 4 dim] added to the time embedding, or null (unconditional).</param>
    public override Tensor forward(Tensor x, Tensor t, Tensor? classEmbedding)
    {
        x = init_conv.forward(x);                                                        // [B, dim, H, W]
        var r = x;
        var temb = time_mlp2.forward(F.gelu(time_mlp1.forward(SinusoidalEmbedding.Embed(t, dim)))); // [B, 4 dim]
        if (classEmbedding is not null) temb = temb + classEmbedding;
        var skips = new Stack<Tensor>();
        foreach (var stage in downs)
        {
            for (var i = 0; i < stage.blocks.Count; i++)
            {
                x = stage.blocks[i].forward(x, temb);
                if (i == stage.blocks.Count - 1)
                    x = stage.attn.forward(x);
                skips.Push(x);
            }
            x = stage.resample.forward(x);                                               // [B, dim_out, H/2, W/2]
        }
        x = mid_block1.forward(x, temb);
        x = mid_attn.forward(x);
        x = mid_block2.forward(x, temb);
        foreach (var stage in ups)
        {
            foreach (var block in stage.blocks)
                x = block.forward(cat(new[] { x, skips.Pop() }, 1), temb);
            x = stage.attn.forward(x);
            x = stage.resample.forward(x);                                               // [B, dim_in, 2H, 2W]
        }
        x = final_res_block.forward(cat(new[] { x, r }, 1), temb);                       // [B, dim, H, W]
        return final_conv.forward(x);                                                    // [B, out, H, W]
    }
}

/// <summary>One resolution level of Ho et al.'s network: ResNet blocks, attention after each (if at an attention side), a resampler.</summary>
internal sealed class HoLevel : nn.Module
{
    public readonly ModuleList<HoResnetBlock> block;
    public readonly ModuleList<HoAttnBlock> attn;
    public readonly nn.Module<Tensor, Tensor>? resample;

    public HoLevel(ModuleList<HoResnetBlock> block, ModuleList<HoAttnBlock> attn, nn.Module<Tensor, Tensor>? resample)
        : base(nameof(HoLevel))
    {
        this.block = block;
        this.attn = attn;
        this.resample = resample;
        RegisterComponents();
    }
}

/// <summary>
/// Ho et al. (2020) CIFAR-10 U-Net (diffusion_tf <c>unet.model</c>; pytorch_diffusion <c>Model</c>):
/// ch = BaseChannels, ch_mult = ChannelMultipliers, num_res_blocks = ResBlocks (ResBlocks + 1 on the way up),
/// single-head attention at feature-map sides in AttentionResolutions, temb 4 ch, conv resampling.
/// 35,746,307 parameters for ch 128, ch_mult 1,2,2,2, 2 blocks, attention at 16, 3x32x32.
/// </summary>
internal sealed class Ho2020UNet : nn.Module<Tensor, Tensor, Tensor?, Tensor>
{
    private readonly long ch;
    private readonly Linear temb_dense0;
    private readonly Linear temb_dense1;
    private readonly Conv2d conv_in;
    private readonly ModuleList<HoLevel> down;
    private readonly HoResnetBlock mid_block_1;
    private readonly HoAttnBlock mid_attn_1;
    private readonly HoResnetBlock mid_block_2;
    private readonly ModuleList<HoLevel> up;   // indexed by level, like pytorch_diffusion's self.up
    private readonly GroupNorm norm_out;
    private readonly Conv2d conv_out;

    public Ho2020UNet(UNetOptions options, long inChannels, long resolution, long outChannels, Func<SampleDropout> newDropout)
        : base(nameof(Ho2020UNet))
    {
        ch = options.BaseChannels;
        long groups = options.GroupNormGroups;
        var mult = options.ChannelMultipliers;
        var levels = mult.Length;
        var numResBlocks = options.ResBlocks;
        var attnResolutions = options.AttentionResolutions.ToHashSet();
        var tembCh = 4 * ch;
        temb_dense0 = nn.Linear(ch, tembCh);
        temb_dense1 = nn.Linear(tembCh, tembCh);
        conv_in = nn.Conv2d(inChannels, ch, 3, padding: 1);

        var currentRes = resolution;
        long InMult(int level) => level == 0 ? 1 : mult[level - 1];   // in_ch_mult = (1,) + ch_mult
        long blockIn = ch;
        down = new ModuleList<HoLevel>();
        for (var level = 0; level < levels; level++)
        {
            var blocks = new ModuleList<HoResnetBlock>();
            var attns = new ModuleList<HoAttnBlock>();
            blockIn = ch * InMult(level);
            var blockOut = ch * mult[level];
            for (var i = 0; i < numResBlocks; i++)
            {
                blocks.Add(new HoResnetBlock(blockIn, blockOut, tembCh, groups, newDropout()));
                blockIn = blockOut;
                if (attnResolutions.Contains((int)currentRes))
                    attns.Add(new HoAttnBlock(blockIn, groups));
            }
            nn.Module<Tensor, Tensor>? resample = null;
            if (level != levels - 1)
            {
                resample = new HoDownsample(blockIn);
                currentRes /= 2;
            }
            down.Add(new HoLevel(blocks, attns, resample));
        }
        mid_block_1 = new HoResnetBlock(blockIn, blockIn, tembCh, groups, newDropout());
        mid_attn_1 = new HoAttnBlock(blockIn, groups);
        mid_block_2 = new HoResnetBlock(blockIn, blockIn, tembCh, groups, newDropout());

        var upLevels = new HoLevel[levels];
        for (var level = levels - 1; level >= 0; level--)
        {
            var blocks = new ModuleList<HoResnetBlock>();
            var attns = new ModuleList<HoAttnBlock>();
            var blockOut = ch * mult[level];
            var skipIn = ch * mult[level];
            for (var i = 0; i <= numResBlocks; i++)
            {
                if (i == numResBlocks)
                    skipIn = ch * InMult(level);
                blocks.Add(new HoResnetBlock(blockIn + skipIn, blockOut, tembCh, groups, newDropout()));
                blockIn = blockOut;
                if (attnResolutions.Contains((int)currentRes))
                    attns.Add(new HoAttnBlock(blockIn, groups));
            }
            nn.Module<Tensor, Tensor>? resample = null;
            if (level != 0)
            {
                resample = new Upsample(blockIn, blockIn);
                currentRes *= 2;
            }
            upLevels[level] = new HoLevel(blocks, attns, resample);
        }
        up = new ModuleList<HoLevel>(upLevels);
        norm_out = Norm.GroupNorm(groups, blockIn, eps: 1e-6);
        conv_out = nn.Conv2d(blockIn, outChannels, 3, padding: 1);
        RegisterComponents();
    }

    /// <param name="classEmbedding">[B, 4 ch] added to the time embedding, or null (unconditional).</param>
    public override Tensor forward(Tensor x, Tensor t, Tensor? classEmbedding)
    {
        var temb = SinusoidalEmbedding.Embed(t, ch);                                     // [B, ch]
        temb = temb_dense1.forward(F.silu(temb_dense0.forward(temb)));                   // [B, 4 ch]
        if (classEmbedding is not null) temb = temb + classEmbedding;
        var hs = new Stack<Tensor>();
        hs.Push(conv_in.forward(x));                                                     // [B, ch, H, W]
        foreach (var level in down)
        {
            for (var i = 0; i < level.block.Count; i++)
            {
                var h = level.block[i].forward(hs.Peek(), temb);
                if (level.attn.Count > 0)
                    h = level.attn[i].forward(h);
                hs.Push(h);
            }
            if (level.resample is not null)
                hs.Push(level.resample.forward(hs.Peek()));                              // [B, C, H/2, W/2]
        }
        var hMid = mid_block_1.forward(hs.Peek(), temb);
        hMid = mid_attn_1.forward(hMid);
        hMid = mid_block_2.forward(hMid, temb);
        var y = hMid;
        for (var l = up.Count - 1; l >= 0; l--)
        {
            var level = up[l];
            for (var i = 0; i < level.block.Count; i++)
            {
                y = level.block[i].forward(cat(new[] { y, hs.Pop() }, 1), temb);
                if (level.attn.Count > 0)
                    y = level.attn[i].forward(y);
            }
            if (level.resample is not null)
                y = level.resample.forward(y);                                           // [B, C, 2H, 2W]
        }
        return conv_out.forward(F.silu(norm_out.forward(y)));                           // [B, out, H, W]
    }
}
