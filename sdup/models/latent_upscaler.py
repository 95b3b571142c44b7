"""The sd-x2-latent-upscaler network ("K-UNet"): k-diffusion's ``image_v1`` U-Net (Katherine Crowson).

It is a denoiser *body* F in Karras preconditioning (the pipeline forms D = c_skip·x + c_out·F[:, :4]);
every norm is an adaptive GroupNorm driven by one conditioning vector ("cond") made from the noise
level and the mapping condition, and the text enters through cross-attention.

Layout (sdup's own names; ``checkpoints/kdiffusion.py`` and ``checkpoints/diffusers.py`` (K-UNet section) map the
two published layouts onto them):

    time_features.weight          (F/2,)  Fourier frequencies applied to c_noise = ln(sigma) / 4
    mapping.cond_proj             Linear(mapping_cond_dim -> F, no bias), added to the Fourier features
    mapping.fc1 / mapping.fc2     Linear -> GELU -> Linear -> GELU: "cond", read by every AdaGN
    proj_in                       1x1 conv, input_channels + unet_cond_channels -> channels[0]
    down.{b}                      level b (0 = full resolution): downsample (b >= 1), then blocks
    down.{b}.blocks.{j}.res         ResConvBlock (norm1, conv1, norm2, conv2, skip)
    down.{b}.blocks.{j}.self_attn   SelfAttention2d   (levels with self_attn_depths[b])
    down.{b}.blocks.{j}.cross_attn  CrossAttention2d  (levels with cross_attn_depths[b])
    up.{u}                        u = 0 is the deepest level (b = levels - 1 - u): concat the skip of
                                  its level (u >= 1), blocks, upsample (u < levels - 1)
    proj_out                      1x1 conv, channels[0] -> input_channels (+ 1 log-variance channel)
    noise_aug_features.weight     (optional, 64,) the original wrapper's Fourier frequencies for the
                                  low-res latent's noise level (``low_res_noise_embed``); only the
                                  k-diffusion file ships them (``KUNetConfig.noise_aug_embed``)

Norm names: ``*.norm*.to_scale_shift`` is the AdaGN Linear(F -> 2C) giving (scale, shift).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.attention import attention, attention_layer, merge_heads, project_qkv, split_heads
from ..nn.layers import Conv2d, group_norm_fp32

NOISE_AUG_STD = 2.0  # std of the wrapper's random Fourier frequencies (only matters for fresh init)


# ------------------------------------------------------------------------------------------------
# config

@dataclass
class KUNetConfig:
    input_channels: int = 4                  # latent channels being denoised
    unet_cond_channels: int = 4              # concatenated low-res latent (x already includes them)
    channels: Sequence[int] = (384, 384, 768, 768)
    depths: Sequence[int] = (4, 4, 4, 4)
    self_attn_depths: Sequence[bool] = (False, False, False, True)
    cross_attn_depths: Sequence[bool] = (False, True, True, True)
    mapping_out: int = 768                   # F: width of the time features and of "cond"
    mapping_cond_dim: int = 896              # 128 noise-level features ++ 768 pooled CLIP; 0 = none
    cross_cond_dim: int = 768                # text token width; 0 = no cross-attention
    head_dim: int = 64                       # per-head width (heads = channels // head_dim)
    group_size: int = 32                     # AdaGN groups = max(1, channels // group_size)
    has_variance: bool = True                # proj_out has one extra (log-variance) channel
    sigma_data: float = 1.0                  # for the low-res conditioning scale 1/sqrt(s² + sigma_data²)
    noise_aug_embed: bool = False            # holds the low-res noise-level Fourier weights (k-diffusion file)

    def __post_init__(self):
        for name in ("channels", "depths", "self_attn_depths", "cross_attn_depths"):
            setattr(self, name, tuple(getattr(self, name)))
        self.self_attn_depths = tuple(bool(v) for v in self.self_attn_depths)
        self.cross_attn_depths = tuple(bool(v) for v in self.cross_attn_depths)
        n = len(self.channels)
        if not (len(self.depths) == len(self.self_attn_depths) == len(self.cross_attn_depths) == n):
            raise ValueError("channels, depths, self_attn_depths and cross_attn_depths need one entry per level")
        if self.cross_cond_dim == 0 and any(self.cross_attn_depths):
            raise ValueError("cross_attn_depths set but cross_cond_dim is 0")
        if self.noise_aug_embed and self.noise_aug_dim <= 0:
            raise ValueError("noise_aug_embed needs mapping_cond_dim > pooled width (= cross_cond_dim)")

    @property
    def out_channels(self) -> int:
        return self.input_channels + int(self.has_variance)

    @property
    def noise_aug_dim(self) -> int:
        """Width of the low-res noise-level embedding at the front of mapping_cond (the rest is the pooled
        text vector, as wide as the text tokens): 896 - 768 = 128."""
        return self.mapping_cond_dim - self.cross_cond_dim

    def heads(self, channels: int) -> int:
        return max(1, channels // self.head_dim)

    def groups(self, channels: int) -> int:
        return max(1, channels // self.group_size)

    # -- from the published k-diffusion config (diffusers config.json: checkpoints.diffusers.kunet_config) --

    @classmethod
    def from_kdiffusion(cls, config: dict, noise_aug_embed: bool | None = None) -> "KUNetConfig":
        """From a k-diffusion config (the whole JSON, e.g. ``config_laion_text_cond_latent_upscaler_2.json``,
        or its ``model`` section). ``noise_aug_embed`` defaults to "the upscaler wrapper is present", i.e.
        mapping_cond_dim > cross_cond_dim > 0 (its checkpoint then holds ``low_res_noise_embed``)."""
        m = config.get("model", config)
        if m.get("type", "image_v1") != "image_v1":
            raise ValueError(f"k-diffusion model type {m.get('type')!r} is not image_v1")
        if m.get("patch_size", 1) != 1 or m.get("skip_stages", 0) != 0:
            raise ValueError("patch_size != 1 / skip_stages != 0 are not supported (the released model uses 1 / 0)")
        n = len(m["channels"])
        cross_dim = m.get("cross_cond_dim", 0)
        cross = m.get("cross_attn_depths") or [False] * n
        if cross_dim == 0:
            cross = [False] * n
        mapping_cond_dim = m.get("mapping_cond_dim", 0)
        if noise_aug_embed is None:
            noise_aug_embed = mapping_cond_dim > cross_dim > 0
        return cls(input_channels=m["input_channels"], unet_cond_channels=m.get("unet_cond_dim", 0),
                   channels=m["channels"], depths=m["depths"], self_attn_depths=m["self_attn_depths"],
                   cross_attn_depths=cross, mapping_out=m["mapping_out"], mapping_cond_dim=mapping_cond_dim,
                   cross_cond_dim=cross_dim, has_variance=m.get("has_variance", False),
                   sigma_data=m.get("sigma_data", 1.0), noise_aug_embed=noise_aug_embed)


def split_io_channels(in_total: int, out: int) -> tuple[int, int, bool]:
    """(input_channels, unet_cond_channels, has_variance) from the proj_in / proj_out widths: the
    upscaler concatenates a same-width low-res latent and predicts one extra log-variance channel
    (8 -> 5); ``out * 2 == in`` means no variance channel."""
    if out * 2 == in_total:
        return out, out, False
    if out < 2:
        raise ValueError(f"cannot split {in_total} input / {out} output channels")
    return out - 1, in_total - (out - 1), True


# ------------------------------------------------------------------------------------------------
# layers

class FourierFeatures(nn.Module):
    """c (B,) -> [cos(2π c w), sin(2π c w)] (B, 2·len(w)); w is a fixed random buffer (not trained)."""

    def __init__(self, out_features: int, std: float = 1.0):
        super().__init__()
        self.register_buffer("weight", torch.randn(out_features // 2) * std)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        angles = c.float()[:, None] * self.weight.float()[None, :] * (2 * math.pi)  # (B, F/2)
        return torch.cat([angles.cos(), angles.sin()], dim=-1)


class MappingNetwork(nn.Module):
    """cond = GELU(fc2(GELU(fc1(time_features + cond_proj(mapping_cond)))))"""

    def __init__(self, width: int, mapping_cond_dim: int):
        super().__init__()
        self.cond_proj = nn.Linear(mapping_cond_dim, width, bias=False) if mapping_cond_dim else None
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, time_features: torch.Tensor, mapping_cond: torch.Tensor | None) -> torch.Tensor:
        h = time_features  # (B, F)
        if self.cond_proj is not None and mapping_cond is not None:
            h = h + self.cond_proj(mapping_cond)
        return F.gelu(self.fc2(F.gelu(self.fc1(h))))


class AdaGroupNorm(nn.Module):
    """GroupNorm without affine, modulated by the conditioning vector:
    y = GN(x) · (1 + scale) + shift, with (scale, shift) = to_scale_shift(cond)."""

    def __init__(self, cond_dim: int, channels: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.to_scale_shift = nn.Linear(cond_dim, 2 * channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.to_scale_shift(cond)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        normed = group_norm_fp32(x, self.groups, eps=self.eps)
        return normed * (1 + scale) + shift


class ResConvBlock(nn.Module):
    """AdaGN -> GELU -> conv3x3 (in -> mid) -> AdaGN -> GELU -> conv3x3 (mid -> out), plus the input
    (through a bias-free 1x1 conv when the width changes)."""

    def __init__(self, cfg: KUNetConfig, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = AdaGroupNorm(cfg.mapping_out, in_ch, cfg.groups(in_ch))
        self.conv1 = Conv2d(in_ch, mid_ch, 3, padding=1)
        self.norm2 = AdaGroupNorm(cfg.mapping_out, mid_ch, cfg.groups(mid_ch))
        self.conv2 = Conv2d(mid_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, bias=False) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.gelu(self.norm1(x, cond)))
        h = self.conv2(F.gelu(self.norm2(h, cond)))
        return h + (x if self.skip is None else self.skip(x))


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W, C)"""
    return x.flatten(2).transpose(1, 2)


def tokens_to_image(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H·W, C) -> (B, C, H, W)"""
    return t.transpose(1, 2).reshape(t.shape[0], -1, height, width)


@attention_layer
class SelfAttention2d(nn.Module):
    """x + out_proj(attention over the pixels of AdaGN(x)); heads of ``head_dim`` channels."""

    def __init__(self, cfg: KUNetConfig, channels: int):
        super().__init__()
        self.heads = cfg.heads(channels)
        self.fusable_qkv = True  # see sdup.optimize.fuse_qkv
        self.norm = AdaGroupNorm(cfg.mapping_out, channels, cfg.groups(channels))
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.out_proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = image_to_tokens(self.norm(x, cond))                               # (B, HW, C)
        q, k, v = (split_heads(t, self.heads) for t in project_qkv(self, tokens))    # (B, h, HW, D)
        out = self.out_proj(merge_heads(attention(q, k, v, layer=self)))          # (B, HW, C)
        return x + tokens_to_image(out, height, width)


@attention_layer
class CrossAttention2d(nn.Module):
    """x + out_proj(attention from the pixels of AdaGN(x) to the LayerNorm'ed text tokens)."""

    def __init__(self, cfg: KUNetConfig, channels: int):
        super().__init__()
        self.heads = cfg.heads(channels)
        self.norm = AdaGroupNorm(cfg.mapping_out, channels, cfg.groups(channels))
        self.text_norm = nn.LayerNorm(cfg.cross_cond_dim)
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(cfg.cross_cond_dim, channels)
        self.v_proj = nn.Linear(cfg.cross_cond_dim, channels)
        self.out_proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, context: torch.Tensor,
                context_bias: torch.Tensor | None = None) -> torch.Tensor:
        height, width = x.shape[-2:]
        q = split_heads(self.q_proj(image_to_tokens(self.norm(x, cond))), self.heads)  # (B, h, HW, D)
        text = self.text_norm(context)                                                   # (B, L, ctx)
        k = split_heads(self.k_proj(text), self.heads)                                   # (B, h, L, D)
        v = split_heads(self.v_proj(text), self.heads)
        out = self.out_proj(merge_heads(attention(q, k, v, bias=context_bias, layer=self)))  # (B, HW, C)
        return x + tokens_to_image(out, height, width)


def resampling_kernel() -> torch.Tensor:
    """The (4, 4) blur [1,3,3,1]/8 ⊗ [1,3,3,1]/8 of Downsample2d (Upsample2d uses 4x it)."""
    k = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    return torch.outer(k, k)  # (4, 4)


class Downsample2d(nn.Module):
    """Reflect-pad 1, then a per-channel 4x4 blur with stride 2 (kernel [1,3,3,1]/8 ⊗ itself)."""

    def __init__(self):
        super().__init__()
        self.init_buffers()

    def init_buffers(self, device=None):
        """The fixed (non-persistent) blur kernel; recomputed after a meta-device build."""
        self.register_buffer("kernel", resampling_kernel().to(device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        weight = self.kernel.to(x)[None, None].repeat(channels, 1, 1, 1)  # (C, 1, 4, 4)
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, stride=2, groups=channels)


class Upsample2d(nn.Module):
    """Reflect-pad 1, then a per-channel stride-2 transposed conv (padding 3) with 4x the blur kernel."""

    def __init__(self):
        super().__init__()
        self.init_buffers()

    def init_buffers(self, device=None):
        """The fixed (non-persistent) blur kernel; recomputed after a meta-device build."""
        self.register_buffer("kernel", 4 * resampling_kernel().to(device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        weight = self.kernel.to(x)[None, None].repeat(channels, 1, 1, 1)  # (C, 1, 4, 4)
        return F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, stride=2, padding=3,
                                  groups=channels)


# ------------------------------------------------------------------------------------------------
# the U-Net

class StageLayer(nn.Module):
    """One ResConvBlock, then self-attention and cross-attention where the level has them."""

    def __init__(self, cfg: KUNetConfig, level: int, in_ch: int, mid_ch: int, out_ch: int):
        super().__init__()
        self.res = ResConvBlock(cfg, in_ch, mid_ch, out_ch)
        self.self_attn = SelfAttention2d(cfg, out_ch) if cfg.self_attn_depths[level] else None
        self.cross_attn = CrossAttention2d(cfg, out_ch) if cfg.cross_attn_depths[level] else None

    def forward(self, x, cond, context, context_bias):
        x = self.res(x, cond)
        if self.self_attn is not None:
            x = self.self_attn(x, cond)
        if self.cross_attn is not None:
            x = self.cross_attn(x, cond, context, context_bias)
        return x


class Stage(nn.Module):
    """A level of the U-Net: [downsample] -> layers -> [upsample]. Within a stage every layer works at
    ``mid_ch`` except that the first reads ``in_ch`` and the last writes ``out_ch``."""

    def __init__(self, cfg: KUNetConfig, level: int, in_ch: int, mid_ch: int, out_ch: int,
                 downsample: bool = False, upsample: bool = False):
        super().__init__()
        depth = cfg.depths[level]
        self.downsample = Downsample2d() if downsample else None
        self.blocks = nn.ModuleList(
            StageLayer(cfg, level, in_ch if j == 0 else mid_ch, mid_ch, out_ch if j == depth - 1 else mid_ch)
            for j in range(depth))
        self.upsample = Upsample2d() if upsample else None

    def forward(self, x, cond, context, context_bias):
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x, cond, context, context_bias)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class KUNet(nn.Module):
    def __init__(self, cfg: KUNetConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or KUNetConfig()
        ch, n = cfg.channels, len(cfg.channels)
        self.time_features = FourierFeatures(cfg.mapping_out)
        self.mapping = MappingNetwork(cfg.mapping_out, cfg.mapping_cond_dim)
        self.proj_in = nn.Conv2d(cfg.input_channels + cfg.unet_cond_channels, ch[0], 1)
        # down level b: ch[b-1] -> ch[b] (downsampling first, except at full resolution)
        self.down = nn.ModuleList(Stage(cfg, b, ch[max(b - 1, 0)], ch[b], ch[b], downsample=b > 0) for b in range(n))
        # up stage u works on level b = n-1-u: input = its width (x2 with the concatenated skip, except the
        # deepest), output = the next-shallower width, upsampling last (except at full resolution)
        self.up = nn.ModuleList()
        for b in reversed(range(n)):
            in_ch = ch[b] if b == n - 1 else 2 * ch[b]
            self.up.append(Stage(cfg, b, in_ch, ch[b], ch[max(b - 1, 0)], upsample=b > 0))
        self.proj_out = nn.Conv2d(ch[0], cfg.out_channels, 1)
        self.noise_aug_features = FourierFeatures(cfg.noise_aug_dim, NOISE_AUG_STD) if cfg.noise_aug_embed else None

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, mapping_cond: torch.Tensor | None,
                context: torch.Tensor | None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The raw network output F.

        x             (B, input_channels + unet_cond_channels, H, W): the (preconditioned) latent with the
                      upsampled low-res latent already concatenated (8 channels); H, W divisible by 2^(levels-1)
        c_noise       (B,) float: ln(sigma) / 4
        mapping_cond  (B, mapping_cond_dim): noise-level features ++ pooled text (896); None = zeros
        context       (B, L, cross_cond_dim): text tokens (CLIP hidden_states[-1], before final LayerNorm)
        context_mask  optional (B, L), 1/True = real token, 0/False = padding: padded keys get -10000 added
                      to their logits, as the original k-diffusion model does (it is given 1 - attention_mask);
                      None = attend to every token, as diffusers does.
        returns       (B, out_channels, H, W): all channels; with ``has_variance`` the last one is the
                      log-variance head, which the pipeline drops (it uses [:, :input_channels]).
        """
        cond = self.mapping(self.time_features(c_noise).to(x.dtype), mapping_cond)  # (B, F)
        context_bias = None
        if context_mask is not None:
            context_bias = (1.0 - context_mask.to(torch.float32))[:, None, None, :] * -10000.0  # (B, 1, 1, L)
        h = self.proj_in(x)                                                     # (B, ch[0], H, W)
        skips = []
        for stage in self.down:
            h = stage(h, cond, context, context_bias)
            skips.append(h)
        skips.pop()  # the deepest output continues as h
        for u, stage in enumerate(self.up):
            if u > 0:
                h = torch.cat([h, skips.pop()], dim=1)                          # (B, 2·ch[b], H_b, W_b)
            h = stage(h, cond, context, context_bias)
        return self.proj_out(h)

    # -- the original wrapper's conditioning (NoiseLevelAndTextConditionedUpscaler) -----------------

    def noise_level_embedding(self, low_res_sigma: torch.Tensor) -> torch.Tensor:
        """(B,) noise level s of the low-res latent -> (B, noise_aug_dim) Fourier features of log1p(s).
        At s = 0 this is [1]*64 ++ [0]*64 whatever the weights (what diffusers hard-codes); other levels
        need the weights that only the k-diffusion file carries."""
        s = low_res_sigma.float()
        if self.noise_aug_features is not None:
            return self.noise_aug_features(torch.log1p(s))
        if bool((s != 0).any()):
            raise ValueError("noise augmentation of the low-res latent (sigma > 0) needs the low_res_noise_embed "
                             "weights, which only the original k-diffusion checkpoint contains")
        half = self.cfg.noise_aug_dim // 2
        return torch.cat([torch.ones(s.shape[0], half), torch.zeros(s.shape[0], half)], dim=1).to(s.device)

    def low_res_conditioning(self, low_res: torch.Tensor, low_res_sigma: torch.Tensor,
                             pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unet_cond, mapping_cond) of the original wrapper: nearest-x2(low_res) / sqrt(s² + sigma_data²),
        and [noise_level_embedding(s), pooled]. ``low_res`` (B, 4, h, w) is the (already noised) low-res
        latent, ``pooled`` (B, 768) the CLIP pooler output."""
        scale = (low_res_sigma.float() ** 2 + self.cfg.sigma_data ** 2).rsqrt()[:, None, None, None]
        unet_cond = F.interpolate(low_res, scale_factor=2, mode="nearest") * scale.to(low_res.dtype)
        mapping_cond = torch.cat([self.noise_level_embedding(low_res_sigma).to(pooled), pooled], dim=1)
        return unet_cond, mapping_cond


def kunet_state_keys(cfg: KUNetConfig) -> list[str]:
    """The state-dict keys of ``KUNet(cfg)`` (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        return list(KUNet(cfg).state_dict())
