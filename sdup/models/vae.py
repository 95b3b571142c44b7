"""The LDM KL autoencoder (f=8 for SD / StableSR / x2, f=4 for the x4 upscaler).

    encoder.conv_in, encoder.down.{i}.res.{j}, encoder.down.{i}.downsample, encoder.mid.{res1,attn,res2},
    encoder.norm_out, encoder.conv_out            i = 0 is the full-resolution level
    quant_conv, post_quant_conv                   1x1 convs on the moments / the latent
    decoder.conv_in, decoder.mid.*, decoder.up.{i}.res.{j}, decoder.up.{i}.upsample, decoder.norm_out,
    decoder.conv_out                              i = 0 is the deepest level (execution order)

Scale factors (0.18215, 0.08333) belong to the pipelines, not to this module.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn import Downsample, ResBlock, Upsample, attention, attention_layer, group_norm
from .configcheck import check_config

VAE_EPS = 1e-6


@dataclass
class VAEConfig:
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3

    @classmethod
    def from_ldm(cls, params: dict) -> "VAEConfig":
        """From ``first_stage_config.params`` of an upstream YAML (``ddconfig`` + ``embed_dim``)."""
        dd = dict(params["ddconfig"])
        if list(dd.get("attn_resolutions", [])):
            raise ValueError("VAE attention outside the mid block (attn_resolutions) is not supported")
        if not dd.get("double_z", True):
            raise ValueError("double_z=False VAEs are not supported (the KL autoencoders all use double_z)")
        names = {f.name for f in fields(cls)}
        kw = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dd.items() if k in names}
        return check_config(cls(embed_dim=params.get("embed_dim", 4), **kw))

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@attention_layer
class MidAttention(nn.Module):
    """Single-head self-attention over all H*W positions (1x1 convs in the checkpoints, Linear here)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels, VAE_EPS)
        self.q_proj = nn.Linear(channels, channels)
        self.k_proj = nn.Linear(channels, channels)
        self.v_proj = nn.Linear(channels, channels)
        self.out_proj = nn.Linear(channels, channels)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (p(tokens)[:, None] for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, 1, H*W, C)
        out = self.out_proj(attention(q, k, v, layer=self)[:, 0])
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class VAEMid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.res1 = ResBlock(channels, channels, eps=VAE_EPS)
        self.attn = MidAttention(channels)
        self.res2 = ResBlock(channels, channels, eps=VAE_EPS)

    def forward(self, x):
        return self.res2(self.attn(self.res1(x)))


class VAELevel(nn.Module):
    def __init__(self):
        super().__init__()
        self.res = nn.ModuleList()


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            level = VAELevel()
            for _ in range(cfg.num_res_blocks):
                level.res.append(ResBlock(ch, cfg.ch * mult, eps=VAE_EPS))
                ch = cfg.ch * mult
            level.downsample = Downsample(ch, asymmetric_pad=True) if i != len(cfg.ch_mult) - 1 else None
            self.down.append(level)
        self.mid = VAEMid(ch)
        self.norm_out = group_norm(ch, VAE_EPS)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def stages(self) -> list[Callable]:
        """What ``forward`` runs, in order, each stage on the previous one's output: conv_in, per level its ResBlocks
        and downsample, mid, norm_out, SiLU, conv_out.  ``tiling.tiled_encode`` runs the same list (the stages
        before ``mid`` on tiles)."""
        stages = [self.conv_in]
        for level in self.down:
            stages += [*level.res] + ([level.downsample] if level.downsample is not None else [])
        return stages + [self.mid, self.norm_out, F.silu, self.conv_out]

    def forward(self, x, return_features: bool = False):
        """x: (B, 3, H, W) in [-1, 1] -> (B, 2z, H/f, W/f); with ``return_features`` also the per-level
        outputs (after each level's ResBlocks, before its downsample), which StableSR's CFW decoder fuses."""
        h, feats = x, []
        for stage in self.stages():
            if stage is self.mid or isinstance(stage, Downsample):
                feats.append(h)  # (B, C_i, H/2^i, W/2^i): the output of level i
            h = stage(h)
        return (h, feats) if return_features else h


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = VAEMid(ch)
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            level = VAELevel()
            for _ in range(cfg.num_res_blocks + 1):
                level.res.append(ResBlock(ch, cfg.ch * mult, eps=VAE_EPS))
                ch = cfg.ch * mult
            level.fuse = None  # per-level hook after the ResBlocks: fuse(h, **inputs) -> h (StableSR's CFW)
            level.upsample = Upsample(ch) if i != 0 else None
            self.up.append(level)
        self.norm_out = group_norm(ch, VAE_EPS)
        self.conv_out = nn.Conv2d(ch, cfg.out_ch, 3, padding=1)

    def stages(self, fuse_inputs: Sequence[dict | None] | None = None) -> list[Callable]:
        """What ``forward`` runs, in order, each stage on the previous one's output: conv_in, mid, per level its
        ResBlocks, its ``fuse`` hook (when set and ``fuse_inputs[j]`` is given; called as ``fuse(h, **inputs)``)
        and its upsample, then norm_out, SiLU, conv_out.  ``tiling.tiled_decode`` runs the same list (the stages
        after ``mid`` on tiles)."""
        stages = [self.conv_in, self.mid]
        for j, level in enumerate(self.up):
            stages += [*level.res]
            if level.fuse is not None and fuse_inputs is not None and fuse_inputs[j] is not None:
                stages.append(functools.partial(level.fuse, **fuse_inputs[j]))
            if level.upsample is not None:
                stages.append(level.upsample)
        return stages + [self.norm_out, F.silu, self.conv_out]

    def forward(self, z, fuse_inputs: Sequence[dict | None] | None = None):
        """z: (B, z_channels, h, w) (after post_quant_conv) -> (B, out_ch, f*h, f*w); ``fuse_inputs``: per level
        (``up`` order), the keyword inputs of its ``fuse`` hook, or None."""
        h = z
        for stage in self.stages(fuse_inputs):
            h = stage(h)
        return h


class DiagonalGaussian:
    """The VAE posterior: mean and log-variance (clamped to [-30, 20] as upstream)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    decoder_class = Decoder  # a subclass swaps in its own decoder (StableSR's CFWAutoencoder)

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        self.decoder = self.decoder_class(cfg)

    def encode(self, image: torch.Tensor) -> DiagonalGaussian:
        """image: (B, 3, H, W) in [-1, 1] -> posterior over (B, embed_dim, H/f, W/f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(image)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, embed_dim, h, w) (unscaled) -> image (B, 3, f*h, f*w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))
