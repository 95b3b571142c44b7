"""StableSR's model parts (IceClear/StableSR): SFT layers for the SD 2.1 UNet, the time-aware
encoder, and the CFW (controllable feature wrapping) autoencoder.

StableSR = a frozen SD 2.1 UNet whose every ResBlock gets an SFT layer (upstream ``SPADE``) fed by a
*time-aware encoder* that looks at the clean low-resolution latent, plus a VAE decoder that fuses the
VAE-encoder features of the low-resolution image (weight ``w``):

    feats = TimeAwareEncoder(z_lr, t)                 {width: (B, 256, h, w)} for each UNet resolution
    eps   = UNet(x_t, t, text, features=feats)        (UNet + ``add_sft_layers``)
    post, enc = CFWAutoencoder.encode(lr_image)       posterior + encoder features of the LR image
    image = CFWAutoencoder.decode(z, enc, w)          w = 0 is exactly the SD decoder

sdup parameter names (the upstream names are mapped by ``sdup.checkpoints.ldm`` (StableSR section)):

    UNet ResBlock hook     <res>.feature_mod.{norm, shared.0, to_gamma, to_beta}
    TimeAwareEncoder       time_embed.fc1/fc2, conv_in, levels.{b}.res.{l}, levels.{b}.attn.{l},
                           levels.{b}.downsample, mid.{res1, attn, res2}, feature_proj.{i}
    CFWAutoencoder         the AutoencoderKL names (encoder.*, quant_conv, post_quant_conv, decoder.*) plus
                           decoder.up.{j}.fuse.{fuse_in, rrdb.{k}.dense.{d}.convs.{c}, fuse_out}
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..nn import Downsample, ResBlock, attention, attention_layer, group_norm, merge_heads, timestep_embedding
from .configcheck import check_config
from .unet import MidBlock, TimeEmbedding, UNet, UNetLevel
from .vae import VAE_EPS, AutoencoderKL, DiagonalGaussian, Decoder, VAEConfig

# ------------------------------------------------------------------------------------------------
# SFT layers inside the UNet (upstream ``ldm/modules/spade.py SPADE`` in ``ResBlockDual``)


class SFT(nn.Module):
    """Spatial feature transform applied to a ResBlock's residual branch (upstream ``SPADE``,
    "spadeinstance3x3"):

        n     = GroupNorm32(32, C)(h)         affine, eps 1e-5 (upstream calls it ``param_free_norm``
                                              but it has weight and bias, and they are in the checkpoint)
        a     = ReLU(conv3x3(feat -> 128))
        out   = n * (1 + conv3x3(a -> C)) + conv3x3(a -> C)

    ``h``: (B, C, H, W) the ResBlock's residual branch after its second conv; ``feat``: (B, F, H, W) the
    time-aware encoder's feature map of the same width (F = 256 for the released model).
    """

    hidden = 128  # hard-coded upstream

    def __init__(self, channels: int, feature_channels: int):
        super().__init__()
        self.norm = group_norm(channels, eps=1e-5)
        self.shared = nn.Sequential(nn.Conv2d(feature_channels, self.hidden, 3, padding=1), nn.ReLU())
        self.to_gamma = nn.Conv2d(self.hidden, channels, 3, padding=1)
        self.to_beta = nn.Conv2d(self.hidden, channels, 3, padding=1)

    def forward(self, h: torch.Tensor, feat: torch.Tensor | None) -> torch.Tensor:
        if feat is None:
            raise ValueError(
                f"StableSR SFT layer got no feature map for width {h.shape[-1]}: pass "
                "features=TimeAwareEncoder(lr_latent, t) (a {width: tensor} dict covering every UNet resolution)")
        a = self.shared(feat.to(h.dtype))        # (B, 128, H, W)
        gamma, beta = self.to_gamma(a), self.to_beta(a)  # (B, C, H, W) each
        return self.norm(h) * (1 + gamma) + beta


def add_sft_layers(unet: UNet, feature_channels: int = 256) -> UNet:
    """Attach one ``SFT`` to every ResBlock of ``unet`` (in place; returns ``unet``).

    The SD 2.1 UNet becomes StableSR's ``UNetModelDualcondV2``: call it with
    ``features={width: (B, feature_channels, h, w)}``. New layers are created on the device/dtype of
    the UNet's parameters. Without this call the UNet is the plain SD UNet.
    """
    p = next(unet.parameters())
    with torch.device(p.device):  # also keeps a meta-device UNet free of real allocations
        for res in unet.res_blocks():
            res.feature_mod = SFT(res.conv2.out_channels, feature_channels).to(dtype=p.dtype)
    return unet


def remove_sft_layers(unet: UNet) -> UNet:
    """Undo ``add_sft_layers`` (gives back the plain SD 2.1 UNet with the same base weights)."""
    for res in unet.res_blocks():
        res.feature_mod = None
    return unet


# ------------------------------------------------------------------------------------------------
# Time-aware encoder (upstream ``EncoderUNetModelWT``)


@dataclass
class TimeAwareEncoderConfig:
    in_channels: int = 4
    model_channels: int = 256
    out_channels: int = 256                          # channels of every emitted feature map (= SFT input)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (4, 2, 1)  # downsampling factors with an attention block
    channel_mult: Sequence[int] = (1, 1, 2, 2)
    num_heads: int = 4                               # used when num_head_channels == -1
    num_head_channels: int = -1

    @classmethod
    def from_ldm(cls, params: dict) -> "TimeAwareEncoderConfig":
        """From ``structcond_stage_config.params`` of a StableSR YAML (unknown keys are ignored)."""
        unsupported = {"use_scale_shift_norm": False, "resblock_updown": False, "use_new_attention_order": False,
                       "conv_resample": True, "dims": 2}
        for k, ok in unsupported.items():
            if params.get(k, ok) != ok:
                raise ValueError(f"time-aware encoder with {k}={params[k]!r} is not supported (StableSR uses {ok!r})")
        if not isinstance(params.get("num_res_blocks", 2), int):
            raise ValueError("per-level num_res_blocks is not supported by the time-aware encoder")
        names = {f.name for f in fields(cls)}
        kw = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in params.items() if k in names}
        return check_config(cls(**kw))

    def heads_for(self, channels: int) -> int:
        return self.num_heads if self.num_head_channels == -1 else channels // self.num_head_channels


@attention_layer
class LegacyAttentionBlock(nn.Module):
    """openaimodel ``AttentionBlock`` with ``QKVAttentionLegacy``: self-attention over the H*W positions.

    GroupNorm32 (eps 1e-5) -> qkv projection to 3C -> heads split *before* q/k/v: the 3C channels are
    ``heads`` contiguous blocks of [q_h | k_h | v_h] (ch = C / heads each) -> softmax(q k^T / sqrt(ch)) v ->
    proj_out -> + x. Upstream scales q and k by ch^-1/4 each; that is the same 1/sqrt(ch) on the logits.
    Upstream stores qkv / proj_out as kernel-1 conv1d weights (o, i, 1); here they are Linear (o, i).
    """

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = group_norm(channels, eps=1e-5)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out_proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")
        # upstream's qkv channels are head-major: (heads, [q, k, v], ch)
        q, k, v = rearrange(self.qkv(tokens), "b n (heads three ch) -> three b heads n ch", heads=self.heads, three=3)
        out = self.out_proj(merge_heads(attention(q, k, v, layer=self)))  # (B, N, C)
        return x + rearrange(out, "b (h w) c -> b c h w", h=h, w=w)


class TimeAwareEncoder(nn.Module):
    """The encoder half of an openaimodel UNet that turns the low-resolution latent into one feature map
    per UNet resolution, modulated by the timestep.

        emb   = MLP(sinusoid(t, C))                      cos-first, (B, 4C)
        h     = conv_in(z_lr)                            (B, C, H, W)
        level b: num_res_blocks x [ResBlock(emb) (+ AttentionBlock if 2^b in attention_resolutions)],
                 then (not on the last level) stride-2 conv
        mid   = ResBlock, AttentionBlock, ResBlock
        collected = [h entering each downsample] + [mid output]      widths W, W/2, W/4, ...
        out[width] = feature_proj[i](collected[i], emb)              (B, out_channels, h_i, w_i)

    Upstream collects "the input of every block that changes the width" (identical to "entering each
    downsample" for any width >= 2) and keys the dict by ``str(width)``; here the keys are ``int``
    widths (the UNet accepts both).
    """

    def __init__(self, cfg: TimeAwareEncoderConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.model_channels
        emb_dim = 4 * C
        self.time_embed = TimeEmbedding(C, emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, C, 3, padding=1)

        feature_channels = []  # channels of each collected map
        ch, ds = C, 1
        self.levels = nn.ModuleList()
        for b, mult in enumerate(cfg.channel_mult):
            level = UNetLevel()
            for _ in range(cfg.num_res_blocks):
                level.res.append(ResBlock(ch, mult * C, emb_dim))
                ch = mult * C
                if ds in cfg.attention_resolutions:
                    level.attn.append(LegacyAttentionBlock(ch, cfg.heads_for(ch)))
            level.downsample = Downsample(ch) if b != len(cfg.channel_mult) - 1 else None
            if level.downsample is not None:
                feature_channels.append(ch)
                ds *= 2
            self.levels.append(level)
        self.mid = MidBlock(ch, emb_dim, LegacyAttentionBlock(ch, cfg.heads_for(ch)))
        feature_channels.append(ch)
        self.feature_proj = nn.ModuleList(ResBlock(c, cfg.out_channels, emb_dim) for c in feature_channels)

    def forward(self, lr_latent: torch.Tensor, timesteps: torch.Tensor) -> dict[int, torch.Tensor]:
        """lr_latent: (B, in, H, W) the *clean* scaled LR latent; timesteps: (B,) or scalar, the original
        0..999 timestep of the current step -> {width: (B, out_channels, h, w)} for widths W, W/2, ..."""
        B = lr_latent.shape[0]
        t = torch.as_tensor(timesteps, device=lr_latent.device).reshape(-1).expand(B)
        t_freq = timestep_embedding(t, self.cfg.model_channels).to(self.time_embed.fc1.weight.dtype)
        emb = self.time_embed(t_freq).to(lr_latent.dtype)  # (B, 4C)

        h = self.conv_in(lr_latent)
        collected = []
        for level in self.levels:
            for i, res in enumerate(level.res):
                h = res(h, emb)
                if len(level.attn):
                    h = level.attn[i](h)
            if level.downsample is not None:
                collected.append(h)  # the last full-width map of this level
                h = level.downsample(h)
        h = self.mid.res2(self.mid.attn(self.mid.res1(h, emb)), emb)
        collected.append(h)
        return {f.shape[-1]: proj(f, emb) for f, proj in zip(collected, self.feature_proj)}


# ------------------------------------------------------------------------------------------------
# CFW autoencoder (upstream ``AutoencoderKLResi`` with ``Decoder_Mix``)


@dataclass
class CFWConfig(VAEConfig):
    """The VAE hyper-parameters plus the fusion ones. Flat on purpose (saved with ``asdict``)."""
    num_fuse_block: int = 2    # RRDBs per fusion layer (upstream Decoder_Mix default; the official file has 2)
    fusion_w: float = 1.0      # default w of ``decode`` (the StableSR scripts pass --dec_w, default 0.5)

    @classmethod
    def from_ldm(cls, params: dict) -> "CFWConfig":
        """From ``model.params`` of a CFW YAML (``autoencoder_kl_64x64x4_resi.yaml`` style: ``ddconfig`` with
        optional ``num_fuse_block``, ``embed_dim``, ``fusion_w``)."""
        base = VAEConfig.from_ldm(params)
        return check_config(cls(**asdict(base), num_fuse_block=int(params["ddconfig"].get("num_fuse_block", 2)),
                                fusion_w=float(params.get("fusion_w", 1.0))))

    def fusion_levels(self) -> list[int]:
        """Resolution levels (0 = full resolution) with a fusion layer: all but the first and the last."""
        return list(range(1, len(self.ch_mult) - 1))

    def feature_levels(self) -> list[int]:
        """Encoder levels whose outputs ``encode`` returns (upstream hard-codes levels 1 and 2)."""
        return list(range(1, max(3, len(self.ch_mult) - 1)))


class DenseBlock(nn.Module):
    """ESRGAN residual dense block: 5 3x3 convs with dense concatenation (growth g = 32), LeakyReLU(0.2)
    after the first four, output ``conv5(...) * 0.2 + x``. Channels in: C, C+g, C+2g, C+3g, C+4g."""

    def __init__(self, channels: int, growth: int = 32):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels + i * growth, growth if i < 4 else channels, 3, padding=1) for i in range(5))

    def forward(self, x):
        feats = [x]
        for conv in self.convs[:4]:
            feats.append(F.leaky_relu(conv(torch.cat(feats, dim=1)), 0.2))  # (B, g, H, W)
        return self.convs[4](torch.cat(feats, dim=1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three DenseBlocks, ``out * 0.2 + x``."""

    def __init__(self, channels: int, growth: int = 32):
        super().__init__()
        self.dense = nn.ModuleList(DenseBlock(channels, growth) for _ in range(3))

    def forward(self, x):
        h = x
        for block in self.dense:
            h = block(h)
        return h * 0.2 + x


class FusionLayer(nn.Module):
    """Upstream ``Fuse_sft_block_RRDB``: ``dec + w * fuse_out(RRDBs(fuse_in(cat[enc, dec])))``.

    ``fuse_in`` is a VAE-style ResBlock 2C -> C with a 1x1 skip, ``fuse_out`` a ResBlock C -> C
    (GroupNorm eps 1e-6, SiLU, no time embedding).
    """

    def __init__(self, channels: int, num_blocks: int = 2):
        super().__init__()
        self.fuse_in = ResBlock(2 * channels, channels, eps=VAE_EPS)
        self.rrdb = nn.Sequential(*(RRDB(channels) for _ in range(num_blocks)))
        self.fuse_out = ResBlock(channels, channels, eps=VAE_EPS)

    def forward(self, dec: torch.Tensor, enc: torch.Tensor, w: float) -> torch.Tensor:
        """dec, enc: (B, C, H, W) -> (B, C, H, W)"""
        f = self.fuse_out(self.rrdb(self.fuse_in(torch.cat([enc, dec], dim=1))))
        return dec + w * f


class CFWDecoder(Decoder):
    """The SD decoder with a ``FusionLayer`` as the ``fuse`` hook (after the ResBlocks, before the upsample) of every
    level but the deepest and the full-resolution one: f=8 -> 512 ch at H/4 and 256 ch at H/2 (upstream
    ``fusion_layer_2``, ``fusion_layer_1``); f=4 -> one. ``decoder.up`` is in execution order (0 = deepest),
    so the fusion layer of resolution level i sits at ``up[n-1-i].fuse``. ``forward`` is ``Decoder.forward``."""

    def __init__(self, cfg: CFWConfig):
        super().__init__(cfg)
        n = len(cfg.ch_mult)
        fused = set(cfg.fusion_levels())
        for j, level in enumerate(self.up):
            i = n - 1 - j
            level.fuse = FusionLayer(cfg.ch * cfg.ch_mult[i], cfg.num_fuse_block) if i in fused else None

    def fuse_inputs(self, enc_features: Sequence[torch.Tensor], w: float) -> list[dict | None] | None:
        """``Decoder.forward``'s hook inputs: ``enc_features`` (``CFWAutoencoder.encode``'s list, index 0 = encoder
        level 1) and the fusion weight w for every fused level; None for w = 0 (the fusion is skipped)."""
        if w == 0:
            return None
        n = len(self.up)
        return [None if level.fuse is None else dict(enc=enc_features[n - 2 - j], w=w)  # level n-1-j's features
                for j, level in enumerate(self.up)]


class CFWAutoencoder(AutoencoderKL):
    """StableSR's VAE: the SD KL autoencoder whose decoder fuses encoder features of the LR image.

    State-dict names are those of ``AutoencoderKL`` plus ``decoder.up.{j}.fuse.*``; ``encode`` also returns the
    encoder features that ``decode`` fuses.
    """
    decoder_class = CFWDecoder

    def encode(self, image: torch.Tensor) -> tuple[DiagonalGaussian, list[torch.Tensor]]:
        """image: (B, 3, H, W) in [-1, 1] -> (posterior over (B, embed_dim, H/f, W/f), enc_features).

        enc_features[k] = output of encoder level k+1 (after its ResBlocks, before its downsample):
        f=8 -> [(B, 256, H/2, W/2), (B, 512, H/4, W/4)], as upstream ``Encoder(return_fea=True)``."""
        moments, feats = self.encoder(image, return_features=True)
        return DiagonalGaussian(self.quant_conv(moments)), [feats[i] for i in self.cfg.feature_levels()]

    def fuse_inputs(self, enc_features: Sequence[torch.Tensor] | None = None,
                    w: float | None = None) -> list[dict | None] | None:
        """The decoder's ``fuse_inputs`` for ``decode(z, enc_features, w)`` (``tiling.tiled_decode`` takes them too).

        w defaults to ``cfg.fusion_w``; without ``enc_features`` only w = 0 (the plain SD decoder) is
        possible, and it is what you get when w is left at its default."""
        if enc_features is None:
            if w not in (None, 0, 0.0):
                raise ValueError(f"CFW decode with w={w} needs the enc_features from encode()")
            return None
        return self.decoder.fuse_inputs(enc_features, float(self.cfg.fusion_w if w is None else w))

    def decode(self, z: torch.Tensor, enc_features: Sequence[torch.Tensor] | None = None,
               w: float | None = None) -> torch.Tensor:
        """z: (B, embed_dim, h, w), unscaled (StableSR passes samples / 0.18215) -> (B, 3, f*h, f*w); ``enc_features``
        and w: see ``fuse_inputs``."""
        return self.decoder(self.post_quant_conv(z), self.fuse_inputs(enc_features, w))
