"""Latent tiles for the diffusion model: StableSR's canvas grid, the blend weights and ``TiledModel``.

* ``tile_grid`` / ``gaussian_weights``: StableSR's canvas grid and blend weights (``"reference"`` bit for bit,
  ``"symmetric"``, ``"uniform"``).
* ``TiledModel(model_fn, tile, overlap, tile_batch, weights)``: a drop-in for a model callable ``model_fn(x, t,
  **cond)`` that runs it on latent tiles and blends the outputs (weights normalised by their sum, float64).
  ``TilePlan.wrap`` (``sdup.tiling.plan``) builds it from a plan.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..distributed import current as current_group
from ..distributed import exchange_tensors, shard

Tensor = torch.Tensor


# ================================================================================================
# grid and weights


def tile_grid(size: int, tile: int, overlap: int) -> list[int]:
    """Tile start offsets along one axis (StableSR ``p_mean_variance_canvas``).

    Offsets 0, (T-O), 2(T-O), ... while ``start + T < size``, then one tile forced to end at the border
    (``size - T``).  If ``size <= tile`` there is one tile at 0 and it shrinks to ``size``
    (use ``min(tile, size)`` as the tile length).
    """
    size, tile, overlap = int(size), int(tile), int(overlap)
    if size <= 0 or tile <= 0:
        raise ValueError(f"size and tile must be positive, got size={size}, tile={tile}")
    if size <= tile:
        return [0]
    stride = tile - overlap
    if overlap < 0 or stride <= 0:
        raise ValueError(f"overlap must be in [0, tile): got tile={tile}, overlap={overlap}")
    starts, s = [], 0
    while s + tile < size:
        starts.append(s)
        s += stride
    starts.append(size - tile)
    return starts


def gaussian_weights(th: int, tw: int, mode: str = "symmetric", var: float = 0.01) -> Tensor:
    """(th, tw) float64 blend weights of one tile.

    ``"reference"``: StableSR / Mixture-of-Diffusers ``_gaussian_weights`` bit for bit:
    ``g(u) = exp(-(u - m)^2 / T^2 / (2 var)) / sqrt(2 pi var)`` with ``m_x = (tw - 1) / 2`` but ``m_y = th / 2``,
    computed with numpy float64 in the same order, ``outer(y, x)``.
    ``"symmetric"``: the same formula with ``m = (T - 1) / 2`` on both axes (the weights are centred).
    ``"uniform"``: all ones (MultiDiffusion averaging).
    """
    if mode == "uniform":
        return torch.ones(th, tw, dtype=torch.float64)
    if mode not in ("reference", "symmetric"):
        raise ValueError(f"weights mode must be 'symmetric', 'reference' or 'uniform', got {mode!r}")
    try:
        import numpy as np
        from numpy import exp, pi, sqrt
    except ImportError:  # pragma: no cover - numpy ships with torch/diffusers; math gives the same up to 1 ulp
        np = None
        from math import exp, pi, sqrt
    mx = (tw - 1) / 2
    my = th / 2 if mode == "reference" else (th - 1) / 2
    xp = [exp(-(x - mx) * (x - mx) / (tw * tw) / (2 * var)) / sqrt(2 * pi * var) for x in range(tw)]
    yp = [exp(-(y - my) * (y - my) / (th * th) / (2 * var)) / sqrt(2 * pi * var) for y in range(th)]
    if np is not None:
        return torch.tensor(np.outer(yp, xp), dtype=torch.float64)
    return torch.tensor([[float(a) * float(b) for b in xp] for a in yp], dtype=torch.float64)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"expected an int or an (h, w) pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


# ================================================================================================
# latent tiling of the diffusion model


class TiledModel:
    """Run ``model_fn(x, t, **cond)`` on overlapping latent tiles and blend the outputs.

    * ``tile``: int or (h, w) in latent px (StableSR: 64 for 512 models, 96 for 768); shrinks to the latent if it
      is smaller; ``overlap``: int or (h, w) (StableSR default 32); ``tile_batch``: tiles per model call (stacked
      along the batch; StableSR ``n_samples``); ``weights``: ``"symmetric"`` | ``"reference"`` | ``"uniform"``.
    * Conditioning: every 4-D tensor with the latent's H x W (x4 ``concat``, StableSR ``lr`` latent, ...) is cut into
      the same tiles; other tensors whose first dim is the batch (text ``context``, class labels ``y``, per-sample
      ``t``) are repeated per tile; everything else (scalars, None, strings, 0-d tensors) is passed through.  Dicts,
      lists and tuples are handled recursively (so ``CFG``-style ``cond=/uncond=`` dicts work).  A 4-D batch tensor
      with another spatial size is refused (compute such features per tile inside ``model_fn``).
    * Outputs: a tensor (B, C_out, h, w) or a tuple of them (a ``DiscreteDenoiser`` returns (eps, x0)); each is
      blended as ``sum_i w_i out_i / sum_i w_i`` in float64 and cast back.
    * One tile covering the latent calls ``model_fn`` once on the untouched inputs (bit-identical).
    * ``group`` (``sdup.distributed.Group``): each rank runs every ``world_size``-th batch of tiles, the outputs are
      exchanged, and every rank blends all of them in the same order: bit-identical to one process (at the same
      number of threads per process: some CPU kernels round differently with another thread count).
    Tiles are visited x-offset outer, y-offset inner (upstream order).  Attributes of ``model_fn`` are forwarded.
    """

    def __init__(self, model_fn: Callable, tile=64, overlap=32, tile_batch: int = 1, weights: str = "symmetric",
                 progress: bool = False, group=None):
        self.model_fn = model_fn
        self.group = group  # sdup.distributed.Group: the tile batches are split over its ranks
        self.progress = progress  # a transient tqdm bar over the tiles of each call
        self.tile = _pair(tile)
        self.overlap = _pair(overlap)
        if tile_batch < 1:
            raise ValueError("tile_batch must be >= 1")
        self.tile_batch = int(tile_batch)
        if weights not in ("symmetric", "reference", "uniform"):
            raise ValueError(f"weights must be 'symmetric', 'reference' or 'uniform', got {weights!r}")
        self.weights = weights
        self._wcache: dict = {}

    def __getattr__(self, name):
        if name == "model_fn":
            raise AttributeError(name)
        return getattr(self.model_fn, name)

    def grid(self, H: int, W: int) -> tuple[int, int, list[tuple[int, int]]]:
        """(th, tw, [(y, x), ...]) for a latent of H x W, in visiting order."""
        th, tw = min(self.tile[0], H), min(self.tile[1], W)
        ys, xs = tile_grid(H, th, self.overlap[0]), tile_grid(W, tw, self.overlap[1])
        return th, tw, [(y, x) for x in xs for y in ys]

    def _weights(self, th, tw, device):
        key = (th, tw, str(device))
        if key not in self._wcache:
            self._wcache[key] = gaussian_weights(th, tw, self.weights).to(device=device, dtype=_acc_dtype(device))
        return self._wcache[key]

    def __call__(self, x: Tensor, t, **cond):
        B, _, H, W = x.shape
        th, tw, tiles = self.grid(H, W)
        if len(tiles) == 1:
            return self.model_fn(x, t, **cond)
        batches = [tiles[k:k + self.tile_batch] for k in range(0, len(tiles), self.tile_batch)]
        group = self.group if self.group is not None else current_group()
        bar = None
        if self.progress and (group is None or group.is_main):
            from tqdm.auto import tqdm
            bar = tqdm(total=len(tiles), desc="tiles", unit="tile", leave=False)

        def run(crops):  # one model call on a batch of tiles -> its outputs, a list
            out = self.model_fn(torch.cat([x[..., y:y + th, x0:x0 + tw] for y, x0 in crops]),
                                _take(t, B, H, W, crops, th, tw), **_take(cond, B, H, W, crops, th, tw))
            if bar is not None:
                bar.update(len(crops) * (1 if group is None else group.world_size))
            return out

        if group is None:
            outputs = [run(crops) for crops in batches]
        else:  # this rank's share of the tile batches, then everyone's outputs on every rank, in tile order
            done = exchange_tensors(lambda: {k: run(batches[k]) for k in shard(range(len(batches)), group)}, group,
                                    device=x.device)
            outputs = [done[k] for k in range(len(batches))]
        if bar is not None:
            bar.close()
        return self._blend(outputs, batches, B, H, W, th, tw, x.device)

    def _blend(self, outputs, batches, B, H, W, th, tw, device):
        """``sum_i w_i out_i / sum_i w_i`` over the tiles, in visiting order (float64 on the CPU)."""
        w = self._weights(th, tw, device)
        single = not isinstance(outputs[0], (tuple, list))
        acc, dtypes = None, None
        wsum = torch.zeros(H, W, dtype=w.dtype, device=device)
        for out, crops in zip(outputs, batches):
            outs = [out] if single else list(out)
            if acc is None:
                acc = [torch.zeros((B, o.shape[1], H, W), dtype=w.dtype, device=device) for o in outs]
                dtypes = [o.dtype for o in outs]
            for o, a in zip(outs, acc):
                if o.shape[0] != len(crops) * B or tuple(o.shape[-2:]) != (th, tw):
                    raise ValueError(f"model output {tuple(o.shape)} does not match the tile batch "
                                     f"({len(crops) * B}, C, {th}, {tw})")
                for i, (y, x0) in enumerate(crops):
                    a[..., y:y + th, x0:x0 + tw] += o[i * B:(i + 1) * B].to(w.dtype) * w
            for y, x0 in crops:
                wsum[y:y + th, x0:x0 + tw] += w
        res = [(a / wsum).to(dt) for a, dt in zip(acc, dtypes)]
        return res[0] if single else tuple(res)


def _take(v: Any, B: int, H: int, W: int, crops, th: int, tw: int) -> Any:
    """Batch the conditioning for ``len(crops)`` tiles stacked along the batch (see ``TiledModel``)."""
    if isinstance(v, Tensor):
        if v.ndim == 4 and tuple(v.shape[-2:]) == (H, W) and v.shape[0] in (1, B):
            v = v.expand(B, *v.shape[1:])
            return torch.cat([v[..., y:y + th, x:x + tw] for y, x in crops])
        if v.ndim >= 1 and v.shape[0] == B:
            if v.ndim == 4:
                raise ValueError(f"conditioning tensor {tuple(v.shape)} is spatial but not {H}x{W}; cut it per "
                                 "tile inside model_fn (e.g. compute StableSR features from the tiled lr latent)")
            return torch.cat([v] * len(crops)) if len(crops) > 1 else v
        return v
    if isinstance(v, dict):
        return {k: _take(u, B, H, W, crops, th, tw) for k, u in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_take(u, B, H, W, crops, th, tw) for u in v)
    return v


# ================================================================================================
