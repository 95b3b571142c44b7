"""Decoding: scaled latents -> images in [-1, 1], one sample at a time, in a chosen dtype with an fp32 fallback."""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from .result import dtype_name

Tensor = torch.Tensor


def decode_scaled(vae, latents: Tensor, scale_factor: float, *, vae_tile: int | None = None, vae_overlap: int = 8,
                  progress: bool = False, vae_dtype: torch.dtype = torch.float32) -> Tensor:
    """Scaled latents (B, C, h, w) -> the VAE decoder's output in [-1, 1] (not clamped), float32 on the CPU.

    One sample at a time, in ``vae_dtype`` whatever the VAE's stored dtype (a VAE stored in another dtype is cast for
    the call only). fp32 is the default: the x4 VAE overflows in fp16. fp16 / bf16 (less memory and time on a GPU):
    a sample whose half-precision decode is not finite is decoded again in fp32, with a warning, instead of becoming
    a black image. ``vae_tile``: decode in latent tiles with ``tiling.tiled_decode`` (exact, bounded memory; always
    fp32: a half-precision VAE is converted to fp32 in place for it)."""
    p = next(vae.parameters())
    if vae_tile:
        from .tiling import tiled_decode
        if p.dtype != torch.float32:
            vae.float()
        vae_dtype = torch.float32
        fp32 = lambda z: tiled_decode(vae, z, tile=vae_tile, overlap=vae_overlap, progress=progress)  # noqa: E731
    else:
        fp32 = _decoder_in(vae, torch.float32)
    half = _decoder_in(vae, vae_dtype) if vae_dtype != torch.float32 else None
    out = []
    for i, z in enumerate(latents.float().split(1)):
        z = (z / scale_factor).to(p.device, torch.float32)
        x = half(z.to(vae_dtype)) if half is not None else None
        if x is not None and not torch.isfinite(x).all():
            warnings.warn(f"sdup: the {dtype_name(vae_dtype)} VAE decode of sample {i} is not finite; "
                          "decoded again in fp32", RuntimeWarning, stacklevel=2)
            x = None
        out.append((fp32(z) if x is None else x).float().cpu())
    return torch.cat(out)


def _decoder_in(vae, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """``vae.decode`` computing in ``dtype``: the module itself when it is stored so, else casted copies of its
    parameters (made on the first call, the module untouched)."""
    if next(vae.parameters()).dtype == dtype:
        return vae.decode
    state = {}

    def run(z):
        if not state:
            from ..optimize import MEMORY_FORMATS, choose_memory_format  # half precision: channels_last where faster
            fmt = MEMORY_FORMATS[choose_memory_format(z.device, dtype)]
            state.update({k: (v.to(dtype, memory_format=fmt if v.dim() == 4 else torch.preserve_format)
                              if v.is_floating_point() else v) for k, v in vae.state_dict().items()})
        return _decode_with(vae, state, z)
    return run


def _decode_with(vae, state: dict, z: Tensor) -> Tensor:
    """``vae.decode(z)`` with the parameters in ``state`` (fp32 copies) instead of the module's own."""
    from torch.func import functional_call

    class _Dec(torch.nn.Module):  # functional_call needs a forward: route it to decode
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, z):
            return self.m.decode(z)
    return functional_call(_Dec(vae), {f"m.{k}": v for k, v in state.items()}, (z,))


def decode_latents(vae, latents: Tensor, scale_factor: float | None = None, *, clamp: bool = True,
                   vae_tile: int | None = None, vae_overlap: int = 8, progress: bool = False,
                   vae_dtype: torch.dtype = torch.float32) -> Tensor:
    """Scaled latents -> images on the CPU in [0, 1] (``clamp=False``: the decoder's raw output in [-1, 1]).
    ``vae``: a VAE module or a LoadedModel (its ``.vae``; ``scale_factor`` defaults to the model's, else SD's
    0.18215).  ``decode_scaled`` does the work (fp32 by default, one sample at a time, ``vae_tile``: exact tiled)."""
    module = vae if hasattr(vae, "decoder") else getattr(vae, "vae", vae)
    if scale_factor is None:
        scale_factor = float(getattr(vae, "scale_factor", 0.18215))
    x = decode_scaled(module, latents, scale_factor, vae_tile=vae_tile, vae_overlap=vae_overlap, progress=progress,
                      vae_dtype=vae_dtype)
    return ((x + 1) / 2).clamp(0, 1) if clamp else x
