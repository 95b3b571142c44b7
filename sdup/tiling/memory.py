"""Rough peak-memory estimates of one upscale: the weights plus the larger of one UNet call (on one latent tile) and
one VAE decode (plain, or ``tiled_decode``).  Not measurements: expect +-50 %.  ``TilePlan`` carries the result;
each upscaler names its UNet's model (``ldm_unet_bytes`` or ``kunet_bytes``) in its ``Upscaler`` record."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .engine import auto_store_bytes

TILED_DECODE_HALO = 16  # latent px assumed around a VAE tile by the estimate


def _levels(cfg):
    """(channels, area factor relative to the latent) of the tiled part's activations, per level."""
    n = len(cfg.ch_mult)
    return [(cfg.ch * m, 4 ** (n - 1 - i)) for i, m in enumerate(cfg.ch_mult)]


def estimate_vae_bytes(cfg, shape: Sequence[int], kind: str = "decode", dtype=torch.float32,
                       tile: int | None = None, halo: int = 0, store_bytes: int = 0) -> int:
    """Rough peak bytes of an (un)tiled VAE pass.

    ``shape``: the latent (B, C, h, w) for ``"decode"``, the image (B, 3, H, W) for ``"encode"``.  Untiled
    (``tile=None``): 4 live activations of the largest level (a ResBlock keeps input, normalised, conv output and the
    sum) plus the mid block (5 maps of C_mid at latent resolution) and the output.  Tiled: the mid block, the output,
    ``store_bytes`` and 5 live activations of a (tile + 2 halo)^2 tile at the largest level.  Efficient attention is
    assumed (the chunked attention logits are counted as 256 MiB at most).
    """
    f = 2 ** (len(cfg.ch_mult) - 1)
    B = shape[0]
    h, w = (shape[-2], shape[-1]) if kind == "decode" else (shape[-2] // f, shape[-1] // f)
    e = torch.tensor([], dtype=dtype).element_size()
    c_mid = cfg.ch * cfg.ch_mult[-1]
    n = h * w
    fixed = 5 * B * c_mid * n * e + min(256 << 20, 4 * n * n)
    io = B * 3 * n * f * f * e + B * cfg.z_channels * 2 * n * e
    levels = _levels(cfg)
    if tile is None:
        peak = max(4 * B * c * a * n * e for c, a in levels)
    else:
        t2 = (min(tile, h) + 2 * halo) * (min(tile, w) + 2 * halo)
        peak = max(5 * B * c * a * t2 * e for c, a in levels) + store_bytes
    return int(fixed + io + peak)


def ldm_unet_bytes(ucfg, th: int, tw: int, batch: int, b: int) -> int:
    """LDM UNet (x4, StableSR): batch x sum over levels of channels x tile pixels x 8 live tensors, plus the
    attention scores of the self-attention levels (heads x N^2, as if materialised)."""
    total = 0
    dis = list(ucfg.disable_self_attentions or [False] * len(ucfg.channel_mult))
    for lvl, mult in enumerate(ucfg.channel_mult):
        ds = 2 ** lvl
        n = math.ceil(th / ds) * math.ceil(tw / ds)
        total += batch * ucfg.model_channels * mult * n * b * 8
        if ds in tuple(ucfg.attention_resolutions) and not dis[lvl]:
            total += batch * ucfg.heads_for(ucfg.model_channels * mult)[0] * n * n * b
    ds = 2 ** (len(ucfg.channel_mult) - 1)
    n_mid = math.ceil(th / ds) * math.ceil(tw / ds)
    if not ucfg.disable_middle_self_attn:
        total += batch * ucfg.heads_for(ucfg.model_channels * ucfg.channel_mult[-1])[0] * n_mid * n_mid * b
    return total


def kunet_bytes(kcfg, th: int, tw: int, batch: int, b: int) -> int:
    """x2 K-UNet: the same rule (8 live tensors per level, self-attention scores where the level has it)."""
    total = 0
    for lvl, (ch, sa) in enumerate(zip(kcfg.channels, kcfg.self_attn_depths)):
        n = math.ceil(th / 2 ** lvl) * math.ceil(tw / 2 ** lvl)
        total += batch * ch * n * b * 8 + (batch * kcfg.heads(ch) * n * n * b if sa else 0)
    return total


def _parameter_bytes(module, b: int) -> int:
    return sum(p.numel() for p in module.parameters()) * b if module is not None else 0


def decode_bytes(vcfg, h: int, w: int, vae_tile: int | None) -> int:
    """One VAE decode of an h x w latent: ``tiled_decode`` (mid block on the whole map with chunked attention, then
    tiles) or the plain decode (the decoder's top level x 4 live fp32 tensors plus the mid-block attention's
    (h w)^2 scores)."""
    f = vcfg.downscale
    if vae_tile:
        largest = max(vcfg.ch * m * (f * h >> lvl) * (f * w >> lvl) * 4 for lvl, m in enumerate(vcfg.ch_mult))
        return estimate_vae_bytes(vcfg, (1, vcfg.embed_dim, h, w), tile=vae_tile, halo=TILED_DECODE_HALO,
                                  store_bytes=auto_store_bytes(largest))
    return vcfg.ch * vcfg.ch_mult[0] * (f * h) * (f * w) * 4 * 4 + (h * w) ** 2 * 4


def estimate_peak_bytes(model, latent_hw: tuple[int, int], tile: int | None, vae_tile: int | None, dtype: str,
                        guidance: float, unet_bytes: Callable) -> int:
    """Rough peak memory of one image: weights (the VAE in fp32) + the larger of one UNet call on one tile
    (``unet_bytes(cfg, th, tw, batch, bytes per value)``, batch 2 under guidance) and one decode, plus the output,
    colour-fix and low-res copies (float32)."""
    b = 4 if dtype == "fp32" else 2
    weights = _parameter_bytes(model.unet, b) + _parameter_bytes(model.vae, 4) + _parameter_bytes(model.text_encoder, b)
    h, w = latent_hw
    th, tw = (min(h, tile), min(w, tile)) if tile else (h, w)
    unet = unet_bytes(model.unet.cfg, th, tw, 1 if guidance == 1 else 2, b)
    f = model.vae.cfg.downscale
    images = 3 * f * h * f * w * 4 * 4
    return int(weights + max(unet, decode_bytes(model.vae.cfg, h, w, vae_tile)) + images)
