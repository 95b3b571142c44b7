"""The one decoder of every pipeline: scaled latents -> the VAE decoder's output in [-1, 1], float32 on the CPU
(and the encoder of an image into scaled latents, for the x2 upscaler's image input).

    decode_scaled(vae, latents, scale_factor, vae_tile=, vae_overlap=, vae_dtype=, features=, dec_w=)
    decode_latents(vae or LoadedModel, latents)       the same, its scale factor, clamped to [0, 1] by default
    recorded_dtype(vae, vae_dtype, vae_tile)          the dtype name a decode runs in (what the parameters record)
    encode_image(vae, image, scale_factor, generators, sample=True)   image in [0, 1] -> scaled latents

The rules, the same for x4, x2, StableSR and txt2img:

* One sample at a time: ``latents[i] / scale_factor`` on the VAE's device.
* ``vae_dtype`` (None: the VAE's own dtype) whatever the VAE's stored dtype: a VAE stored in another dtype is run on
  cast copies of its parameters for the call (the module untouched).  fp32 is the x4 / x2 / txt2img default: the x4
  VAE overflows in fp16.  A half-precision decode that is not finite is decoded again in fp32, with a warning,
  instead of becoming a black image.
* ``vae_tile``: in latent tiles (``tiling.tiled_decode``: exact, bounded memory, split over a process group), always in
  fp32: a half-precision VAE is converted to fp32 in place for it.
* ``features`` (StableSR's CFW autoencoder): each sample's encoder features, fused into the decoder with the fidelity
  weight ``dec_w``, plain or tiled.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Sequence

import torch
from torch.func import functional_call

from ..diffusion.samplers import randn
from ..optimize import MEMORY_FORMATS, choose_memory_format
from ..tiling import tiled_decode
from .result import dtype_name

Tensor = torch.Tensor


def decode_scaled(vae, latents: Tensor, scale_factor: float, *, vae_tile: int | None = None, vae_overlap: int = 8,
                  progress: bool = False, vae_dtype: torch.dtype | None = torch.float32,
                  features: Sequence[list[Tensor]] | None = None, dec_w: float | None = None) -> Tensor:
    """Scaled latents (B, C, h, w) -> the decoder's output (B, 3, H, W) in [-1, 1] (not clamped), float32 on the
    CPU, by the rules of the module docstring. ``features[i]``: sample i's CFW encoder features (None: no fusion)."""
    p = next(vae.parameters())
    vae_dtype = p.dtype if vae_dtype is None else vae_dtype
    if vae_tile:
        if p.dtype != torch.float32:
            vae.float()
        vae_dtype = torch.float32
    one = functools.partial(_decode_one, tile=vae_tile, overlap=vae_overlap, dec_w=dec_w, progress=progress)
    fp32 = _in_dtype(vae, torch.float32, one)
    half = _in_dtype(vae, vae_dtype, one) if vae_dtype != torch.float32 else None
    out = []
    for i, z in enumerate(latents.float().split(1)):
        z = (z / scale_factor).to(p.device, torch.float32)
        f = features[i] if features is not None else None
        x = half(z.to(vae_dtype), _cast(f, p.device, vae_dtype)) if half is not None else None
        if x is not None and not torch.isfinite(x).all():
            warnings.warn(f"sdup: the {dtype_name(vae_dtype)} VAE decode of sample {i} is not finite; "
                          "decoded again in fp32", RuntimeWarning, stacklevel=2)
            x = None
        out.append((fp32(z, _cast(f, p.device, torch.float32)) if x is None else x).float().cpu())
    return torch.cat(out)


def decode_latents(vae, latents: Tensor, scale_factor: float | None = None, *, clamp: bool = True,
                   **options) -> Tensor:
    """Scaled latents -> images on the CPU in [0, 1] (``clamp=False``: the decoder's raw output in [-1, 1]).
    ``vae``: a VAE module or a LoadedModel (its ``.vae``; ``scale_factor`` defaults to the model's, else SD's
    0.18215); ``options``: those of ``decode_scaled`` (fp32 by default)."""
    module = vae if hasattr(vae, "decoder") else getattr(vae, "vae", vae)
    if scale_factor is None:
        scale_factor = float(getattr(vae, "scale_factor", 0.18215))
    x = decode_scaled(module, latents, scale_factor, **options)
    return ((x + 1) / 2).clamp(0, 1) if clamp else x


def recorded_dtype(vae, vae_dtype: torch.dtype | None, vae_tile: int | None) -> str:
    """The name of the dtype ``decode_scaled`` decodes in (tiled: fp32; None: the VAE's own)."""
    if vae_tile:
        return "float32"
    return dtype_name(vae_dtype if vae_dtype is not None else next(vae.parameters()).dtype)


def _cast(features: list[Tensor] | None, device, dtype: torch.dtype) -> list[Tensor] | None:
    return None if features is None else [f.to(device, dtype) for f in features]


def _decode_one(vae, z: Tensor, features: list[Tensor] | None, *, tile: int | None, overlap: int,
                dec_w: float | None, progress: bool) -> Tensor:
    """One sample's ``vae.decode(z)`` (a CFW autoencoder: fusing ``features`` with weight ``dec_w``), whole or in
    latent tiles."""
    if tile:
        fuse = vae.fuse_inputs(features, float(dec_w)) if features is not None else None
        return tiled_decode(vae, z, tile=tile, overlap=overlap, fuse_inputs=fuse, progress=progress)
    return vae.decode(z, features, float(dec_w)) if features is not None else vae.decode(z)


def _in_dtype(vae, dtype: torch.dtype, fn: Callable) -> Callable:
    """``fn(vae, *args)`` computing in ``dtype``: on the module itself when it is stored so, else on cast copies of
    its parameters (made on the first call, the module untouched)."""
    if next(vae.parameters()).dtype == dtype:
        return functools.partial(fn, vae)
    state = {}

    def run(z: Tensor, *args):
        if not state:
            fmt = MEMORY_FORMATS[choose_memory_format(z.device, dtype)]
            state.update({k: (v.to(dtype, memory_format=fmt if v.dim() == 4 else torch.preserve_format)
                              if v.is_floating_point() else v) for k, v in vae.state_dict().items()})
        return functional_call(_Call(vae, fn), {f"m.{k}": v for k, v in state.items()}, (z, *args))
    return run


class _Call(torch.nn.Module):
    """A module whose forward is ``fn(m, *args)``: ``functional_call`` runs it on the swapped parameters."""

    def __init__(self, m: torch.nn.Module, fn: Callable):
        super().__init__()
        self.m, self.fn = m, fn

    def forward(self, *args):
        return self.fn(self.m, *args)


def encode_image(vae, image: Tensor, scale_factor: float = 0.18215, generators=None, sample: bool = True) -> Tensor:
    """Image (B, 3, H, W) in [0, 1] -> scaled SD latents (B, 4, H/f, W/f): posterior sample (noise drawn from
    ``generators``, one per sample, as diffusers' ``latent_dist.sample(generator)``) or its mean. ``vae``: a VAE
    module or a LoadedModel (its ``.vae``)."""
    vae = vae if hasattr(vae, "decoder") else getattr(vae, "vae", vae)
    p = next(vae.parameters())
    f = vae.cfg.downscale if getattr(vae, "cfg", None) is not None else 8
    if image.shape[-2] % f or image.shape[-1] % f:
        raise ValueError(f"image size must be a multiple of {f} (the VAE's downsampling), got "
                         f"{image.shape[-2]}x{image.shape[-1]}")
    out = []
    for i, x in enumerate(image.float().split(1)):
        post = vae.encode((2 * x - 1).to(p.device, p.dtype))
        if sample:
            g = generators[i] if isinstance(generators, (list, tuple)) else generators
            z = post.mean.float() + post.std.float() * randn(post.mean.shape, g, device=post.mean.device)
        else:
            z = post.mean.float()
        out.append(z * scale_factor)
    return torch.cat(out)
