"""``tiled_decode`` / ``tiled_encode``: ``vae.decode`` / ``vae.encode`` with bounded memory and no seams.

They run the VAE's own stages (``Decoder.stages`` / ``Encoder.stages``): the mid block on the whole latent (its
attention over query chunks), the convolutional stages on tiles cropped with their exact receptive field
(``sdup.tiling.engine``), every GroupNorm with the statistics of the whole image.  The result equals the untiled one
up to float rounding.
"""
from __future__ import annotations

import torch

from ..distributed import current as current_group
from ..distributed import shard
from ..models.vae import DiagonalGaussian
from ..nn import get_attention_backend, use_attention_backend
from .engine import _Engine, _Grid, auto_store_bytes
from .latent import _pair

Tensor = torch.Tensor


def _chunked_attention(n_tokens: int, attn_chunk: int | None, logits_budget: int = 64 << 20, group=None):
    """Context for the mid block on the whole map: its attention over query chunks of ``attn_chunk``, each with the
    selected backend (``group``: the chunks split over its ranks).  Default chunk: math (and chunked) keep the fp32
    logits and their softmax (2 x chunk x N x 4 bytes) within ``logits_budget``; sdpa and triton, which never
    materialise them, get 1024."""
    backend = get_attention_backend()
    inner = "math" if backend in ("math", "chunked") else backend
    if attn_chunk:
        chunk = int(attn_chunk)
    elif inner == "math":
        chunk = max(64, min(n_tokens, logits_budget // max(1, 8 * n_tokens)))
    else:
        chunk = min(n_tokens, 1024)
    return use_attention_backend("chunked", chunk_size=chunk, chunk_backend=inner, group=group)


def _downscale(vae) -> int:
    cfg = getattr(vae, "cfg", None)
    if cfg is not None and hasattr(cfg, "ch_mult"):
        return 2 ** (len(cfg.ch_mult) - 1)
    return 2 ** sum(lv.upsample is not None for lv in vae.decoder.up)


def _run_info(info: dict | None, grid: _Grid, eng: _Engine) -> None:
    if info is not None:
        info.update(tiles=len(grid.tiles), sweeps=eng.sweeps, halo=eng.max_halo_used,
                    own_tiles=len(grid.tiles if eng.group is None else shard(grid.tiles, eng.group)))


@torch.inference_mode()
def tiled_decode(vae, z: Tensor, tile=64, overlap=8, progress: bool = False, *, halo: int | None = None,
                 store_bytes: int | None = None, store_device=None, attn_chunk: int | None = None,
                 fuse_inputs=None, info: dict | None = None, group=None) -> Tensor:
    """``vae.decode(z)`` with bounded memory and no seams (docs/tiling.md): the decoder's own stages, everything
    after the mid block on tiles.

    z: (B, embed_dim, h, w), unscaled.  ``tile`` / ``overlap``: int or (h, w) in latent px; ``halo``: None = the
    exact receptive field (the result equals ``vae.decode`` up to float rounding), an int = at most that many latent
    px (approximate, cheaper); ``store_bytes``: memory for kept tile states and level checkpoints (None =
    ``auto_store_bytes``; 0 = always recompute); ``store_device``: where they live (e.g. ``"cpu"`` while decoding
    on a GPU: GPU memory then holds only the mid maps, the output and one tile); ``attn_chunk``: query chunk of the
    mid attention (default 1024; with the math backend, what keeps the fp32 logits within 64 MiB); ``fuse_inputs``:
    the decoder's per-level hook inputs (a CFW autoencoder: ``vae.fuse_inputs(enc_features, w)``); ``info``: a dict
    that receives the number of tiles, of sweeps, the largest halo used (latent px) and the tiles this process ran.

    ``group`` (``sdup.distributed.Group``; default: ``distributed.current()``): the mid-block attention's query
    chunks and the tiles are split over its ranks, whose GroupNorm sums and tile outputs are exchanged and added in
    tile order on every rank: every rank gets the single-process result, bit for bit (at equal threads per
    process). The rest of the mid block (its ResBlocks, a small part of the work) runs on every rank.
    """
    group = group if group is not None else current_group()
    stages = vae.decoder.stages(fuse_inputs)
    m = stages.index(vae.decoder.mid) + 1
    grid = _Grid(z.shape[-2], z.shape[-1], _pair(tile), _pair(overlap))
    eng = _Engine(stages[m:], grid, 1, store_bytes, halo, progress, "tiled VAE decode", store_device, group)
    h = vae.post_quant_conv(z)
    with _chunked_attention(z.shape[-2] * z.shape[-1], attn_chunk, group=group):
        for stage in stages[:m]:  # conv_in and the mid block on the whole latent
            h = stage(h)
    out = eng.run(h)
    _run_info(info, grid, eng)
    return out


@torch.inference_mode()
def tiled_encode(vae, image: Tensor, tile=512, overlap=32, progress: bool = False, *, halo: int | None = None,
                 store_bytes: int | None = None, store_device=None, attn_chunk: int | None = None,
                 info: dict | None = None, group=None) -> DiagonalGaussian:
    """``vae.encode(image)`` with bounded memory: the encoder's stages before the mid block run on pixel tiles
    (``tile``, ``overlap``: int or (h, w) in pixels, rounded down to multiples of the downscale factor f), the rest
    and ``quant_conv`` on the latent-resolution map.  H and W must be multiples of f.
    ``halo`` (latent px), ``store_bytes``, ``store_device``, ``attn_chunk``, ``info``, ``group``: as ``tiled_decode``."""
    group = group if group is not None else current_group()
    f = _downscale(vae)
    H, W = image.shape[-2:]
    if H % f or W % f:
        raise ValueError(f"tiled_encode needs H and W divisible by {f}, got {H}x{W} (pad the image first)")
    stages = vae.encoder.stages()
    m = stages.index(vae.encoder.mid)
    th, tw = _pair(tile)
    oh, ow = _pair(overlap)
    grid = _Grid(H // f, W // f, (max(1, th // f), max(1, tw // f)), (oh // f, ow // f))
    eng = _Engine(stages[:m], grid, f, store_bytes, halo, progress, "tiled VAE encode", store_device, group)
    h = eng.run(image)
    _run_info(info, grid, eng)
    with _chunked_attention(grid.H * grid.W, attn_chunk, group=group):
        for stage in stages[m:]:  # the mid block, norm_out, SiLU, conv_out on the whole latent
            h = stage(h)
    return DiagonalGaussian(vae.quant_conv(h))
