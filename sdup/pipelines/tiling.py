"""Tiling: latent tiles for the diffusion model (any sampler) and the exact tiled VAE (docs/tiling.md).

* ``tile_grid`` / ``gaussian_weights``: StableSR's canvas grid and blend weights (``"reference"`` bit for bit,
  ``"symmetric"``, ``"uniform"``).
* ``TiledModel(model_fn, tile, overlap, tile_batch, weights)``: a drop-in for a model callable ``model_fn(x, t,
  **cond)`` that runs it on latent tiles and blends the outputs (weights normalised by their sum, float64).
* ``tiled_decode`` / ``tiled_encode``: ``vae.decode`` / ``vae.encode`` with bounded memory and no seams.  They run
  the VAE's own stages (``Decoder.stages`` / ``Encoder.stages``): the mid block on the whole latent (its attention
  over query chunks), the convolutional stages on tiles cropped with their exact receptive field, every GroupNorm
  with the statistics of the whole image.  The result equals the untiled one up to float rounding.
* ``estimate_vae_bytes`` / ``needs_tiling`` / ``auto_tile``: memory estimates and tile sizes from a budget.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import current as current_group
from ..distributed import exchange_tensors, shard
from ..models.vae import DiagonalGaussian
from ..nn import Downsample, ResBlock, Upsample, get_attention_backend, use_attention_backend

Tensor = torch.Tensor

__all__ = ["tile_grid", "gaussian_weights", "TiledModel", "tiled_decode", "tiled_encode", "estimate_vae_bytes",
           "needs_tiling", "auto_tile"]


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
# tiled VAE: the stages


class _Barrier(Exception):
    """Raised by the GroupNorm pre-hook when the whole-image statistics of that norm are not known yet (after the
    tile's share was added to them): the tile stops there until every tile has contributed."""

    def __init__(self, norm: nn.GroupNorm, x: Tensor):
        super().__init__()
        self.norm, self.x = norm, x  # the norm and its input
        self.stage, self.state = None, None  # where the tile stopped (set by _Engine._forward)


_POINTWISE = (F.silu,)  # the plain functions allowed as stages


def _stage_module(stage):
    """The module behind a stage (a ``functools.partial`` of a module is a hook with its inputs bound)."""
    return stage.func if isinstance(stage, functools.partial) else stage


def _check_conv(conv: nn.Conv2d, stride: int = 1, padding: int | None = None):
    k = conv.kernel_size[0]
    ok = tuple(conv.kernel_size) in ((3, 3), (1, 1)) and tuple(conv.stride) == (stride, stride) \
        and conv.groups == 1 and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros" \
        and tuple(conv.padding) == ((k // 2,) * 2 if padding is None else (padding, padding))
    if not ok:
        raise ValueError(f"tiled VAE: unexpected conv {conv}")


def _geometry(stage) -> tuple[str, int]:
    """(kind, depth) of a stage: ``"up"`` (nearest x2, then a 3x3 conv), ``"down"`` (pad right / bottom, stride-2
    3x3 conv) or ``"local"`` with ``depth`` = its number of 3x3 convs (the longest chain of them at most: exact for
    the sequential and dense stacks here).  Stages may hold only convs and GroupNorms (plus parameter-free layers)."""
    m = _stage_module(stage)
    if not isinstance(m, nn.Module):
        if m in _POINTWISE:
            return "local", 0
        raise ValueError(f"tiled VAE: unknown stage {stage!r} (plain functions must be one of {_POINTWISE})")
    if isinstance(m, Upsample):
        _check_conv(m.conv)
        return "up", 1
    if isinstance(m, Downsample):
        if not m.asymmetric_pad:
            raise ValueError("tiled VAE expects the LDM asymmetric-pad downsample")
        _check_conv(m.conv, stride=2, padding=0)
        return "down", 1
    depth = 0
    for sub in m.modules():
        if isinstance(sub, nn.Conv2d):
            _check_conv(sub)
            depth += sub.kernel_size[0] == 3
        elif not isinstance(sub, nn.GroupNorm) and next(sub.parameters(recurse=False), None) is not None:
            raise ValueError(f"tiled VAE: {type(sub).__name__} inside {type(m).__name__} is not a conv or a "
                             "GroupNorm (time embeddings, attention: not supported on tiles)")
    return "local", depth


def _out_channels(stage, c: int) -> int:
    """Channels after a stage: those of its last conv (``c`` without one)."""
    m = _stage_module(stage)
    convs = [s for s in m.modules() if isinstance(s, nn.Conv2d)] if isinstance(m, nn.Module) else []
    return convs[-1].out_channels if convs else c


def _receptive_halo(geoms: Sequence[tuple[str, int]], r_start: int) -> int:
    """Halo (latent px) that keeps every position of a tile exact through the stages (backward receptive field)."""
    h = 0
    for kind, depth in reversed(geoms):
        if kind == "up":
            h = math.ceil((h + 1) / 2)
        elif kind == "down":
            h = 2 * h + 2
        else:
            h += depth
    return math.ceil(h / r_start)


# ================================================================================================
# tiled VAE: geometry


class _Grid:
    """Tiles on the latent grid (H x W) and their normalised feather weights at any integer resolution r."""

    def __init__(self, H: int, W: int, tile: tuple[int, int], overlap: tuple[int, int]):
        self.H, self.W = H, W
        self.th, self.tw = min(tile[0], H), min(tile[1], W)
        self.ys = tile_grid(H, self.th, overlap[0])
        self.xs = tile_grid(W, self.tw, overlap[1])
        self.tiles = [(iy, ix) for iy in range(len(self.ys)) for ix in range(len(self.xs))]
        self._w: dict = {}

    def region(self, tile, r: int) -> tuple[int, int, int, int]:
        iy, ix = tile
        y, x = self.ys[iy], self.xs[ix]
        return y * r, (y + self.th) * r, x * r, (x + self.tw) * r

    def weights(self, tile, r: int, device) -> tuple[Tensor, Tensor]:
        key = (r, str(device))
        if key not in self._w:
            wy = _feather(self.ys, self.th, self.H, r)
            wx = _feather(self.xs, self.tw, self.W, r)
            dt = _acc_dtype(torch.device(device))
            self._w[key] = ([w.to(device, dt) for w in wy], [w.to(device, dt) for w in wx])
        wy, wx = self._w[key]
        return wy[tile[0]], wx[tile[1]]


def _feather(starts: Sequence[int], tile: int, size: int, r: int) -> list[Tensor]:
    """1-D linear ramps over the actual overlaps at resolution r, normalised to sum to 1 at every position."""
    ends = [s + tile for s in starts]
    total = torch.zeros(size * r, dtype=torch.float64)
    ws = []
    for i, s in enumerate(starts):
        p = torch.arange(s * r, ends[i] * r, dtype=torch.float64) + 0.5
        w = torch.ones_like(p)
        if i > 0 and ends[i - 1] > s:
            w = torch.minimum(w, (p - s * r) / ((ends[i - 1] - s) * r))
        if i + 1 < len(starts) and ends[i] > starts[i + 1]:
            w = torch.minimum(w, (ends[i] * r - p) / ((ends[i] - starts[i + 1]) * r))
        ws.append(w)
        total[s * r:ends[i] * r] += w
    return [w / total[s * r:e * r] for w, s, e in zip(ws, starts, ends)]


class _State:
    """A tile's activation ``t`` whose top-left pixel is (y0, x0) of the image at resolution r; ``h``: where a
    ResBlock stage stopped at its second GroupNorm, that norm's input (the block resumes from it, ``ResBlock.second``,
    instead of running its first convolution again)."""

    __slots__ = ("t", "y0", "x0", "r", "h")

    def __init__(self, t, y0, x0, r, h=None):
        self.t, self.y0, self.x0, self.r, self.h = t, y0, x0, r, h

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in (self.t, self.h) if v is not None)


# ================================================================================================
# tiled VAE: the engine


class _Engine:
    """Runs ``stages`` (what the model's forward calls, in order) on tiles, with whole-image GroupNorm statistics."""

    def __init__(self, stages, grid: _Grid, r0: int, store_bytes: int | None, halo: int | None, progress: bool,
                 desc: str, store_device=None, group=None):
        self.stages, self.grid = list(stages), grid
        self.group = group  # sdup.distributed.Group: every rank runs its share of the tiles
        self.geoms = [_geometry(s) for s in self.stages]
        self.r_at = [r0]  # resolution before stage i
        for kind, _ in self.geoms:
            r = self.r_at[-1]
            self.r_at.append(2 * r if kind == "up" else r // 2 if kind == "down" else r)
        self.norms = [m for s in self.stages if isinstance(_stage_module(s), nn.Module)
                      for m in _stage_module(s).modules() if isinstance(m, nn.GroupNorm)]
        self.store_bytes = None if store_bytes is None else max(0, int(store_bytes))  # None: auto_store_bytes in run
        self.store_device = None if store_device is None else torch.device(store_device)
        self.dev = None
        self.halo = halo
        self.stats: dict[nn.GroupNorm, tuple[Tensor, Tensor]] = {}  # (B, C) fp32 scale and shift of each norm
        self.acc = None    # [norm, r, {tile: (sum w x, sum w x^2)}] of the norm being gathered
        self.where = None  # (tile, state) of the stage being run, for the GroupNorm hooks
        self.c_at: list[int] = []
        self.progress = progress
        self.desc = desc
        self.max_halo_used = 0
        self.sweeps = 0

    # -- single-tile execution
    def _crop(self, src: Tensor, tile, halo: int, r: int) -> _State:
        g = self.grid
        ry0, ry1, rx0, rx1 = g.region(tile, r)
        hr = halo * r
        y0, y1 = max(0, ry0 - hr), min(g.H * r, ry1 + hr)
        x0, x1 = max(0, rx0 - hr), min(g.W * r, rx1 + hr)
        return _State(src[..., y0:y1, x0:x1].to(self.dev), y0, x0, r)

    def _move(self, st: _State, device) -> _State:
        if device is None or st.t.device == device:
            return st
        move = lambda v: None if v is None else v.to(device, non_blocking=device.type == "cuda")  # noqa: E731
        return _State(move(st.t), st.y0, st.x0, st.r, move(st.h))  # non-blocking: host -> GPU only

    def _cut(self, v, st: _State):
        """A full-image map passed to a hook, cut to the tile (other inputs unchanged)."""
        if not isinstance(v, Tensor):
            return v
        full = (self.grid.H * st.r, self.grid.W * st.r)
        if v.ndim != 4 or tuple(v.shape[-2:]) != full:
            raise ValueError(f"tiled VAE: hook input {tuple(v.shape)} is not a map of the image at {full}")
        h, w = st.t.shape[-2:]
        return v[..., st.y0:st.y0 + h, st.x0:st.x0 + w].to(self.dev)

    def _call(self, s: int, st: _State, tile) -> Tensor:
        stage = self.stages[s]
        self.where = (tile, st)
        if st.h is not None:  # a ResBlock resumed at its second GroupNorm
            return stage.second(st.t, st.h)
        if isinstance(stage, functools.partial):  # a hook with its inputs: cut their maps to the tile
            return stage.func(st.t, *stage.args, **{k: self._cut(v, st) for k, v in stage.keywords.items()})
        return stage(st.t)

    def _forward(self, st: _State, i: int, j: int, tile) -> _State:
        """Stages i..j-1 on one tile.  Tensors keep their size: 3x3 convs zero-pad every side, which is exact on
        image borders and spoils one more pixel per conv on the others (the halo is wider than that)."""
        for s in range(i, j):
            try:
                t = self._call(s, st, tile)
            except _Barrier as stop:
                stop.stage, stop.state = s, st
                if self._resumable(s, stop.norm):
                    stop.state = _State(st.t, st.y0, st.x0, st.r, stop.x)
                raise
            kind = self.geoms[s][0]
            if kind == "up":
                st = _State(t, 2 * st.y0, 2 * st.x0, 2 * st.r)
            elif kind == "down":
                if st.y0 % 2 or st.x0 % 2:
                    raise RuntimeError("tiled VAE: a tile reached a downsample at an odd offset (internal error)")
                st = _State(t, st.y0 // 2, st.x0 // 2, st.r // 2)
            else:
                st = _State(t, st.y0, st.x0, st.r)
        self.where = None
        return st

    def _resumable(self, s: int, norm: nn.GroupNorm) -> bool:
        """Whether a tile stopped at ``norm`` in stage s can resume there: the stage is a ResBlock (no hooks that
        its forward would have to call) and ``norm`` its second GroupNorm."""
        m = self.stages[s]
        hooks = (m._forward_hooks or m._forward_pre_hooks or nn.modules.module._global_forward_hooks
                 or nn.modules.module._global_forward_pre_hooks) if isinstance(m, nn.Module) else True
        return isinstance(m, ResBlock) and norm is m.norm2 and not hooks

    def _own(self, x: Tensor, st: _State, tile) -> tuple[Tensor, Tensor, Tensor, tuple]:
        """The tile's own region of ``x`` (a map with the geometry of ``st``) and its normalised weights."""
        req = self.grid.region(tile, st.r)
        h, w = x.shape[-2:]
        dy0, dy1, dx0, dx1 = req[0] - st.y0, req[1] - st.y0, req[2] - st.x0, req[3] - st.x0
        if dy0 < 0 or dx0 < 0 or dy1 > h or dx1 > w:
            raise RuntimeError("tiled VAE: tile lost its own region (internal error)")
        wy, wx = self.grid.weights(tile, st.r, x.device)
        return x[..., dy0:dy1, dx0:dx1], wy, wx, req

    # -- GroupNorm hooks (registered on every GroupNorm of the stages while run() runs)
    def _gather(self, norm: nn.GroupNorm, args):
        """Pre-hook: statistics not known yet -> add the tile's share to them and stop the tile."""
        if norm in self.stats:
            return None
        tile, st = self.where
        self._accumulate(norm, args[0], st, tile)
        raise _Barrier(norm, args[0])

    def _normalize(self, norm: nn.GroupNorm, args, out):
        """Hook: the output normalised with the whole-image statistics instead (fp32 affine, as GroupNorm32)."""
        scale, shift = self.stats[norm]
        x = args[0]
        return (x.float() * scale[:, :, None, None] + shift[:, :, None, None]).to(x.dtype)

    def _accumulate(self, norm, x: Tensor, st: _State, tile):
        """Keep the tile's weighted per-channel sums of x and x^2 (float64) for the statistics of ``norm``.

        Per tile: shift by the tile's own channel mean m (fp32), rows reduced against the x-weights in fp32 (short
        dot products), the rest in float64; then sum w x = sum w (x-m) + m sum w and
        sum w x^2 = sum w (x-m)^2 + 2 m sum w (x-m) + m^2 sum w, so there is no cancellation within a tile."""
        x, wy, wx, _ = self._own(x, st, tile)
        dt = wy.dtype
        B, C = x.shape[:2]
        if self.acc is None:
            self.acc = [norm, st.r, {}]
        if self.acc[0] is not norm:
            raise RuntimeError("tiled VAE: tiles stopped at different GroupNorms (internal error)")
        s1, s2 = (torch.empty(B, C, dtype=dt, device=x.device) for _ in range(2))
        wx32 = wx.to(torch.float32)
        wsum = wy.sum() * wx.sum()
        step = max(1, (1 << 22) // max(1, x[0, 0].numel() * B))  # ~4M elements per chunk
        for c0 in range(0, C, step):
            xc = x[:, c0:c0 + step].float()
            m = xc.mean(dim=(-2, -1), keepdim=True)
            xc = xc - m
            d1 = (xc @ wx32).to(dt) @ wy                      # (B, c)
            d2 = ((xc * xc) @ wx32).to(dt) @ wy
            m = m.flatten(1).to(dt)
            s1[:, c0:c0 + step] = d1 + m * wsum
            s2[:, c0:c0 + step] = d2 + 2 * m * d1 + m * m * wsum
        self.acc[2][tile] = (s1, s2)

    def _finalize(self):
        """The whole-image scale and shift of the norm being gathered: the tiles' sums added in tile order."""
        norm, r, sums = self.acc
        self.acc = None
        s1, s2 = (sum(sums[t][k] for t in self.grid.tiles) for k in (0, 1))
        B, C = s1.shape
        G = norm.num_groups
        n = (C // G) * (self.grid.H * r) * (self.grid.W * r)
        mean = s1.view(B, G, -1).sum(-1) / n
        var = (s2.view(B, G, -1).sum(-1) / n - mean * mean).clamp_min(0)
        rstd = (var + norm.eps).rsqrt()
        gamma = norm.weight.to(s1.dtype) if norm.weight is not None else torch.ones(C, dtype=s1.dtype,
                                                                                    device=s1.device)
        beta = norm.bias.to(s1.dtype) if norm.bias is not None else torch.zeros_like(gamma)
        scale = gamma[None] * rstd.repeat_interleave(C // G, dim=1)
        shift = beta[None] - mean.repeat_interleave(C // G, dim=1) * scale
        self.stats[norm] = (scale.float(), shift.float())

    def _map_bytes(self, i: int, ref: Tensor) -> int:
        r = self.r_at[i]
        return ref.shape[0] * self.c_at[i] * self.grid.H * r * self.grid.W * r * ref.element_size()

    # -- driver
    def run(self, src: Tensor) -> Tensor:
        n = len(self.stages)
        self.dev = src.device
        self.c_at = [src.shape[1]]
        for stage in self.stages:
            self.c_at.append(_out_channels(stage, self.c_at[-1]))
        if self.store_bytes is None:  # auto: room for the largest level map as a checkpoint
            self.store_bytes = auto_store_bytes(max(self._map_bytes(i, src) for i in range(n + 1)))
        bounds = [0]
        for i, (kind, depth) in enumerate(self.geoms[:-1]):
            # checkpoints after stages with convs; a map no larger than the (always stored) start map is free,
            # others need half the store budget
            if (kind != "local" or depth) and \
                    self._map_bytes(i + 1, src) <= max(self.store_bytes // 2, self._map_bytes(0, src)):
                bounds.append(i + 1)
        bounds.append(n)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(self.norms) + len(bounds) - 1, desc=self.desc)
        hooks = [h for norm in self.norms for h in (norm.register_forward_pre_hook(self._gather),
                                                    norm.register_forward_hook(self._normalize))]
        try:
            for a, b in zip(bounds, bounds[1:]):
                inter = sum(self._map_bytes(j, src) for j in (a, b) if 0 < j < n
                            and self._map_bytes(j, src) > self._map_bytes(0, src))
                src = self._segment(a, b, src, max(0, self.store_bytes - inter), bar)
        finally:
            for h in hooks:
                h.remove()
            if bar is not None:
                bar.close()
        return src

    def _segment(self, a: int, b: int, src: Tensor, keep_budget: int, bar) -> Tensor:
        """Stages a..b-1 on every tile: sweeps that each gather the statistics of the next GroupNorm (the tiles
        stop there; their states are kept while they fit in ``keep_budget``, else recomputed from ``src``), then
        the sweep that runs every tile to the end and assembles the output map with the feather weights."""
        g = self.grid
        halo = _receptive_halo(self.geoms[a:b], self.r_at[a])
        if self.halo is not None:
            halo = min(halo, int(self.halo))
        self.max_halo_used = max(self.max_halo_used, halo)
        kept: dict = {}  # tile -> (stage, state) where it stopped, while they fit in keep_budget
        intermediate = b < len(self.stages)

        def sweep(tiles):  # -> (out map or None, the GroupNorm the tiles stopped at or None, {tile: weighted part})
            out, gathering, parts = None, None, {}
            for tile in tiles:
                i, st = kept.pop(tile, (a, None))
                st = self._crop(src, tile, halo, self.r_at[a]) if st is None else self._move(st, self.dev)
                try:
                    st = self._forward(st, i, b, tile)
                except _Barrier as stop:
                    gathering = stop.norm
                    if sum(s.nbytes() for _, s in kept.values()) + stop.state.nbytes() <= keep_budget:
                        kept[tile] = (stop.stage, self._move(stop.state, self.store_device))
                    continue
                if self.group is None:
                    out = self._assemble(out, st, tile, intermediate)
                else:
                    parts[tile] = self._weighted(st, tile)
            return out, gathering, parts

        while True:
            if self.group is None:
                out, gathering, _ = sweep(g.tiles)
            else:  # in rounds: every rank runs one tile, then the round's results are added in tile order everywhere
                out = gathering = None
                W, rank = self.group.world_size, self.group.rank
                for k in range(0, len(g.tiles), W):
                    mine = g.tiles[k + rank:k + rank + 1]
                    out, gathering = self._exchange(lambda: sweep(mine), mine, out, self.r_at[b], intermediate)
            if (out is None) == (gathering is None):
                raise RuntimeError("tiled VAE: some tiles stopped at a GroupNorm, others did not (internal error)")
            self.sweeps += 1
            if bar is not None:
                bar.update(1)
            if gathering is None:
                return out.to(out.device if intermediate else self.dev, src.dtype)
            self._finalize()

    def _weighted(self, st: _State, tile) -> Tensor:
        """The tile's own region times its feather weights (fp32 for half-precision maps)."""
        x, wy, wx, _ = self._own(st.t, st, tile)
        dt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        return x.to(dt) * (wy[:, None] * wx[None, :]).to(dt)

    def _assemble(self, out: Tensor | None, st: _State, tile, intermediate: bool,
                  part: Tensor | None = None) -> Tensor:
        """Add the tile's weighted own region (``part``, else computed from ``st``) to the output map (created on
        the first call)."""
        part = self._weighted(st, tile) if part is None else part
        ry0, ry1, rx0, rx1 = self.grid.region(tile, st.r)
        if out is None:
            g = self.grid
            dev = self.store_device if (intermediate and self.store_device is not None) else part.device
            out = torch.zeros(part.shape[0], part.shape[1], g.H * st.r, g.W * st.r, dtype=part.dtype, device=dev)
        out[..., ry0:ry1, rx0:rx1] += part.to(out.device)
        return out

    def _exchange(self, sweep, tiles: list, out: Tensor | None, r_out: int, intermediate: bool):
        """One round of a sweep over all ranks (``sweep()`` runs this rank's ``tiles``, one or none): every rank
        gets the round's GroupNorm sums (the statistics follow in tile order once every round is in), or adds the
        round's weighted tile regions to ``out`` in tile order. Rounds take the tiles in order (tile k*W + r is
        rank r's k-th), so the additions happen in the single-process order while each rank holds only one tile's
        result at a time. A rank without a tile learns from the others what the round was; a rank whose tile raised
        stops every rank."""
        index = {t: i for i, t in enumerate(self.grid.tiles)}

        def send():
            _, gathering, parts = sweep()
            if gathering is not None:
                norm, r, sums = self.acc
                return {("sums", index[t], self.norms.index(norm), r): sums[t] for t in tiles}
            return {("out", index[t], r_out): v for t, v in parts.items()}

        got = exchange_tensors(send, self.group, device=self.dev)
        if not got:
            raise RuntimeError("tiled VAE: no rank ran a tile (internal error)")
        if len({(k[0],) + k[2:] for k in got}) != 1:
            raise RuntimeError("tiled VAE: the ranks' tiles stopped at different places (internal error)")
        first = next(iter(got))
        if first[0] == "sums":
            n, r = first[2:]
            if self.acc is None:  # no tile of this rank stopped at the norm yet
                self.acc = [self.norms[n], r, {}]
            self.acc[2].update({self.grid.tiles[k[1]]: v for k, v in got.items()})
            return None, self.norms[n]
        for k in sorted(got, key=lambda k: k[1]):
            out = self._assemble(out, _State(None, 0, 0, r_out), self.grid.tiles[k[1]], intermediate, got[k])
        return out, None


# ================================================================================================
# public VAE API


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


DEFAULT_STORE_BYTES = 1 << 30
MAX_AUTO_STORE_BYTES = 4 << 30


def auto_store_bytes(largest_map_bytes: int) -> int:
    """The default ``store_bytes``: twice the largest level map (so every level can be a checkpoint and a GroupNorm
    sweep recomputes at most one stage), at least ``DEFAULT_STORE_BYTES``, at most ``MAX_AUTO_STORE_BYTES``."""
    return int(min(MAX_AUTO_STORE_BYTES, max(DEFAULT_STORE_BYTES, 2 * largest_map_bytes)))


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


# ================================================================================================
# memory estimates and automatic tile sizes


def _levels(cfg, kind: str):
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
    levels = _levels(cfg, kind)
    if tile is None:
        peak = max(4 * B * c * a * n * e for c, a in levels)
    else:
        t2 = (min(tile, h) + 2 * halo) * (min(tile, w) + 2 * halo)
        peak = max(5 * B * c * a * t2 * e for c, a in levels) + store_bytes
    return int(fixed + io + peak)


def needs_tiling(shape: Sequence[int], budget_bytes: int, cfg=None, kind: str = "decode",
                 dtype=torch.float32) -> bool:
    """True when the untiled VAE pass is estimated to exceed ``budget_bytes`` (``cfg`` defaults to the SD VAE)."""
    if cfg is None:
        from ..models.vae import VAEConfig
        cfg = VAEConfig()
    return estimate_vae_bytes(cfg, shape, kind, dtype) > budget_bytes


def auto_tile(shape: Sequence[int], budget_bytes: int, cfg=None, kind: str = "decode", dtype=torch.float32,
              candidates: Sequence[int] = (128, 96, 64, 48, 32, 24, 16)) -> dict | None:
    """Pick VAE tiling settings from a memory budget.

    Returns None when no tiling is needed, else ``dict(tile=, overlap=, store_bytes=)`` in the units of
    ``tiled_decode`` (latent px) or ``tiled_encode`` (pixels): the largest candidate tile whose estimate fits, with
    ``store_bytes`` = a quarter of the budget left after the fixed costs (more = fewer recomputations).  If even the
    smallest tile does not fit, the smallest is returned with ``store_bytes=0`` (best effort).
    """
    if cfg is None:
        from ..models.vae import VAEConfig
        cfg = VAEConfig()
    if not needs_tiling(shape, budget_bytes, cfg, kind, dtype):
        return None
    f = 2 ** (len(cfg.ch_mult) - 1)
    halo = 16 if kind == "decode" else 80 // f + 1
    for t in candidates:
        base = estimate_vae_bytes(cfg, shape, kind, dtype, tile=t, halo=halo, store_bytes=0)
        if base <= budget_bytes:
            store = (budget_bytes - base) // 4
            unit = 1 if kind == "decode" else f
            return dict(tile=t * unit, overlap=8 * unit if kind == "decode" else 32, store_bytes=int(store))
    t = candidates[-1]
    unit = 1 if kind == "decode" else f
    return dict(tile=t * unit, overlap=8 * unit if kind == "decode" else 32, store_bytes=0)
