"""The LDM "openaimodel" UNet: SD 1.x, SD 2.x, the x4 upscaler UNet and the StableSR UNet (via the hook).

Layout (names are sdup's own; the loaders map both official layouts onto them):

    time_embed.fc1/fc2            sinusoid(C) -> Linear(C, 4C) -> SiLU -> Linear(4C, 4C)
    class_embed                   Embedding(num_classes, 4C), added to the time embedding (x4 noise level)
    conv_in                       3x3, in_channels -> C
    down.{b}.res.{l}              ResBlock per level b, l < num_res_blocks
    down.{b}.attn.{l}             SpatialTransformer after res l (empty list on levels without attention)
    down.{b}.downsample           stride-2 conv (every level but the last)
    mid.res1 / mid.attn / mid.res2
    up.{b}.res.{l}, up.{b}.attn.{l}, up.{b}.upsample   b = 0 is the deepest level, l < num_res_blocks + 1
    norm_out, conv_out

Per-resolution feature conditioning: ``forward(..., features={width: tensor})``. Each ResBlock whose
``feature_mod`` is set (StableSR's SFT layers) receives ``features[h.shape[-1]]`` for its own
feature-map width ``h``. Without ``features`` (or without feature_mods) this is the plain UNet.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import Downsample, ResBlock, SpatialTransformer, Upsample, group_norm, timestep_embedding
from .configcheck import check_config


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (4, 2, 1)  # downsampling factors (ds) that get a SpatialTransformer
    num_heads: int = 8                                # used when num_head_channels == -1
    num_head_channels: int = -1                       # SD2 / StableSR: 64 (heads = ch // 64)
    context_dim: int = 768
    transformer_depth: int = 1
    use_linear_in_transformer: bool = False           # SD1: 1x1 convs in the checkpoint; SD2/x4: Linear
    disable_self_attentions: Sequence[bool] | None = None  # per level: attn1 reads the text instead (x4)
    disable_middle_self_attn: bool = False
    num_classes: int | None = None                    # x4: 1000 noise levels -> class_embed

    @classmethod
    def from_ldm(cls, params: dict) -> "UNetConfig":
        """Build from the ``unet_config.params`` of an upstream YAML (unknown/irrelevant keys are ignored)."""
        names = {f.name for f in fields(cls)}
        kw = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in params.items() if k in names}
        if params.get("legacy", False):
            raise ValueError("legacy=True UNet head rule is not supported (no released SD model uses it)")
        if params.get("use_scale_shift_norm", False):
            raise ValueError("use_scale_shift_norm=True is not supported (no released SD model uses it)")
        if params.get("num_classes") == "sequential":
            raise ValueError("num_classes='sequential' (SDXL-style adm) is not supported")
        return check_config(cls(**kw))

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, dim_head) at a level with ``channels`` channels (the ``legacy: False`` rule)."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels


class UNetLevel(nn.Module):
    """ResBlocks, optional SpatialTransformers after each, optional resampler at the end."""

    def __init__(self):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()


class MidBlock(nn.Module):
    def __init__(self, channels: int, emb_dim: int, attn: nn.Module):
        super().__init__()
        self.res1 = ResBlock(channels, channels, emb_dim)
        self.attn = attn
        self.res2 = ResBlock(channels, channels, emb_dim)


class TimeEmbedding(nn.Module):
    def __init__(self, channels: int, emb_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, emb_dim)
        self.fc2 = nn.Linear(emb_dim, emb_dim)

    def forward(self, t_freq):
        return self.fc2(F.silu(self.fc1(t_freq)))


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        C, L = cfg.model_channels, cfg.num_res_blocks
        emb_dim = 4 * C
        levels = len(cfg.channel_mult)
        no_self = list(cfg.disable_self_attentions or [False] * levels)

        def transformer(ch: int, level_no_self: bool) -> SpatialTransformer:
            heads, dim_head = cfg.heads_for(ch)
            return SpatialTransformer(ch, heads, dim_head, cfg.context_dim, cfg.transformer_depth, level_no_self)

        self.time_embed = TimeEmbedding(C, emb_dim)
        self.class_embed = nn.Embedding(cfg.num_classes, emb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, C, 3, padding=1)

        skip_channels = [C]
        ch, ds = C, 1
        self.down = nn.ModuleList()
        for b, mult in enumerate(cfg.channel_mult):
            level = UNetLevel()
            for _ in range(L):
                level.res.append(ResBlock(ch, mult * C, emb_dim))
                ch = mult * C
                if ds in cfg.attention_resolutions:
                    level.attn.append(transformer(ch, no_self[b]))
                skip_channels.append(ch)
            level.downsample = Downsample(ch) if b != levels - 1 else None
            if level.downsample is not None:
                skip_channels.append(ch)
                ds *= 2
            self.down.append(level)

        self.mid = MidBlock(ch, emb_dim, transformer(ch, cfg.disable_middle_self_attn))

        self.up = nn.ModuleList()
        for b, mult in reversed(list(enumerate(cfg.channel_mult))):
            level = UNetLevel()
            for _ in range(L + 1):
                level.res.append(ResBlock(ch + skip_channels.pop(), mult * C, emb_dim))
                ch = mult * C
                if ds in cfg.attention_resolutions:
                    level.attn.append(transformer(ch, no_self[b]))
            level.upsample = Upsample(ch) if b != 0 else None
            if level.upsample is not None:
                ds //= 2
            self.up.append(level)

        self.norm_out = group_norm(C, eps=1e-5)
        self.conv_out = nn.Conv2d(C, cfg.out_channels, 3, padding=1)

    def res_blocks(self):
        """Every ResBlock in execution order (where per-resolution conditioning hooks attach)."""
        for level in self.down:
            yield from level.res
        yield self.mid.res1
        yield self.mid.res2
        for level in self.up:
            yield from level.res

    def forward(self, x, timesteps, context=None, y=None, features: dict | None = None):
        """x: (B, in, H, W) with H, W multiples of 2**(levels-1); timesteps: (B,) ints or floats;
        context: (B, 77, context_dim); y: (B,) class labels (x4 noise level); features: {width: (B, c, h, w)}."""
        t_freq = timestep_embedding(timesteps.reshape(-1).expand(x.shape[0]), self.cfg.model_channels)  # (B, C) fp32
        emb = self.time_embed(t_freq.to(self.time_embed.fc1.weight.dtype))
        if self.class_embed is not None:
            if y is None:
                raise ValueError("this UNet has a class embedding (x4 noise level): pass y=")
            emb = emb + self.class_embed(y)
        emb = emb.to(x.dtype)
        cond = (lambda h: features.get(h.shape[-1], features.get(str(h.shape[-1])))) if features else (lambda h: None)

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for i, res in enumerate(level.res):
                h = res(h, emb, cond(h))
                if len(level.attn):
                    h = level.attn[i](h, context)
                skips.append(h)
            if level.downsample is not None:
                h = level.downsample(h)
                skips.append(h)

        h = self.mid.res1(h, emb, cond(h))
        h = self.mid.attn(h, context)
        h = self.mid.res2(h, emb, cond(h))

        for level in self.up:
            for i, res in enumerate(level.res):
                h = torch.cat([h, skips.pop()], dim=1)
                h = res(h, emb, cond(h))
                if len(level.attn):
                    h = level.attn[i](h, context)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
