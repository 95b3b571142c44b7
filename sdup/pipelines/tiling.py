"""Tiling: latent-tile diffusion (any sampler) and seam-free tiled VAE encode / decode (SPEC §5.6 B, §7.14, §8).

Latent tiles for the diffusion model
------------------------------------
``tile_grid`` is StableSR's canvas grid (offsets 0, T-O, 2(T-O), ... while start + T < size; the last tile is
forced to end at the border; a size <= T gives one tile, and the tile shrinks to the image).
``gaussian_weights`` gives the blend weights: ``"reference"`` is StableSR's ``_gaussian_weights`` bit for bit
(numpy float64, var 0.01, x centre (T-1)/2 but y centre T/2, factor 1/sqrt(2 pi var)); ``"symmetric"`` (default)
uses the centre (T-1)/2 on both axes; ``"uniform"`` is MultiDiffusion's plain average.
``TiledModel(model_fn, tile, overlap, tile_batch, weights)`` is a drop-in replacement for any model callable
``model_fn(x, t, **cond)``: it runs the model on tiles and blends the outputs with the weights normalised by their
sum (accumulated in float64).  Put it around the raw network (``DiffusionWrapper``), under ``CFG`` and the
denoisers, like StableSR (guidance and x0 formation on the blended output), or around a denoiser; both work with
every sampler.

Tiled VAE (exact by default)
----------------------------
``tiled_decode`` / ``tiled_encode`` run the convolutional part of the decoder (everything after the mid block) /
encoder (everything before the mid block) tile by tile, and everything at the mid resolution on the whole map:

* **Convolutions** see their real neighbours: every tile is cropped with a halo equal to the exact receptive field
  of the tiled ops up to the next checkpoint (computed from the op list: +1 per 3x3 conv, halved through a nearest x2 upsample, 2h+2 through
  the stride-2 downsample), and each 3x3 conv is evaluated *valid* on interior sides (the tile shrinks by one pixel
  there) and zero-padded only on real image borders, exactly like the full-image conv.  Asymmetric VAE downsampling
  keeps its parity (tiles are aligned to the latent grid).
* **GroupNorm** uses statistics of the WHOLE image: every GN layer is a barrier; a sweep over all tiles accumulates
  per-sample, per-channel weighted sums of x and x^2 over each tile's own share of the image (the normalised
  feather weights, a partition of unity; per tile shifted by the tile's channel mean, rows reduced in fp32, the
  rest and the accumulation across tiles in float64), the group mean / biased variance are formed once, and every
  tile is then normalised with them (fp32 affine, as GroupNorm32).
* **Mid block** (ResBlocks + the single-head attention over all positions) runs on the full mid-resolution map; the
  attention runs over query chunks with the selected ``sdup.nn`` backend (math backend: logits chunk x N, at most
  64 MiB by default; sdpa: its own memory-efficient kernel), plus ~4 maps of C_mid x N.  Exact.
* Overlapping output regions are **feathered** (linear ramps over the actual overlap, normalised to sum to 1).

So with the default ``halo=None`` the tiled result equals the untiled one up to floating-point summation order
(no approximation at all); the measured differences are ~1e-6 of the output range.  Passing a smaller ``halo``
(latent px) trades exactness for compute: interior tile sides are then zero-padded once the halo is used up (the
only approximation), and the feathering hides the resulting seams.

Memory vs compute: GN barriers are sequential, so a sweep must reach barrier k in every tile before barrier k can
be applied.  Tile states (activation + pending skip) are kept between sweeps while they fit in ``store_bytes``;
otherwise a tile is recomputed from the last checkpoint.  Full maps after every ResBlock and every up/down
sample become checkpoints (segment boundaries, re-cut with a fresh halo) when they fit in ``store_bytes / 2`` (or
are no larger than the start map, which is stored anyway).  ``store_device="cpu"`` keeps states and checkpoints in
host memory (multidiffusion style) so that a GPU holds only the mid maps, the output and one tile.  Peak memory on
the compute device is therefore about mid-block maps + output + one tile's working set (+ ``store_bytes`` unless
offloaded), independent of the image size except for the mid-resolution and output maps.  Compute: with enough
store, ~1x a plain decode plus halo/overlap overhead (measured 1.3-3x for tiny 12-px tiles); with ``store_bytes=0``
every GN sweep recomputes from the last checkpoint, up to ~(number of GN layers / 2) decodes plus the overhead of
the larger halo -- avoid it for large models (x4 decoder with 12-px tiles: 30x a plain decode).

Not supported here: StableSR's CFW fusion (decode with w > 0) and the encoder's ``return_features`` (both need
full-resolution feature maps); a CFW autoencoder is decoded with w = 0 (its plain SD decoder).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..models.vae import DiagonalGaussian
from ..nn import attention

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
        bar = None
        if self.progress and (self.group is None or self.group.is_main):
            from tqdm.auto import tqdm
            bar = tqdm(total=len(tiles), desc="tiles", unit="tile", leave=False)

        def run(crops):  # one model call on a batch of tiles -> its outputs, a list
            out = self.model_fn(torch.cat([x[..., y:y + th, x0:x0 + tw] for y, x0 in crops]),
                                _take(t, B, H, W, crops, th, tw), **_take(cond, B, H, W, crops, th, tw))
            if bar is not None:
                bar.update(len(crops) * (1 if self.group is None else self.group.world_size))
            return out

        if self.group is None:
            outputs = [run(crops) for crops in batches]
        else:  # this rank's share of the tile batches, then everyone's outputs on every rank, in tile order
            from ..distributed import exchange, shard
            mine = {k: run(batches[k]) for k in shard(range(len(batches)), self.group)}
            outputs = [None] * len(batches)
            for part in exchange(lambda: {k: _to(o, "cpu") for k, o in mine.items()}, self.group):
                for k, o in part.items():
                    outputs[k] = _to(o, x.device)
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


def _to(out, device):
    """A model output (a tensor or a tuple of them) on ``device``."""
    return out.to(device) if isinstance(out, Tensor) else type(out)(o.to(device) for o in out)


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
# tiled VAE: op lists


@dataclass
class _Op:
    kind: str            # "conv" | "up" | "down" | "push" | "add" | "gn" | "ckpt"
    mod: Any = None      # conv / norm module (add: the 1x1 skip conv or None)


def _resblock_ops(res) -> list[_Op]:
    if getattr(res, "time_proj", None) is not None or getattr(res, "feature_mod", None) is not None:
        raise ValueError("tiled VAE: ResBlocks with time embedding / feature modulation are not supported")
    return [_Op("push"), _Op("gn", res.norm1), _Op("conv", res.conv1), _Op("gn", res.norm2), _Op("conv", res.conv2),
            _Op("add", res.skip), _Op("ckpt")]


def _decoder_ops(decoder) -> list[_Op]:
    """Everything after the mid block (input: the mid output at latent resolution)."""
    ops: list[_Op] = []
    for level in decoder.up:
        for res in level.res:
            ops += _resblock_ops(res)
        if level.upsample is not None:
            ops += [_Op("up", level.upsample.conv), _Op("ckpt")]
    return ops + [_Op("gn", decoder.norm_out), _Op("conv", decoder.conv_out)]


def _encoder_ops(encoder) -> list[_Op]:
    """conv_in and the down path (output: the mid block's input at latent resolution)."""
    ops = [_Op("conv", encoder.conv_in)]
    for level in encoder.down:
        for res in level.res:
            ops += _resblock_ops(res)
        if level.downsample is not None:
            if not getattr(level.downsample, "asymmetric_pad", False):
                raise ValueError("tiled VAE expects the LDM asymmetric-pad downsample")
            ops += [_Op("down", level.downsample.conv), _Op("ckpt")]
    return ops


def _check_conv3(conv, stride=1):
    if tuple(conv.kernel_size) != (3, 3) or tuple(conv.stride) != (stride, stride) or conv.groups != 1 \
            or tuple(conv.dilation) != (1, 1):
        raise ValueError(f"tiled VAE: unexpected conv {conv}")


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
    """A tile's activation ``t`` whose top-left pixel is (y0, x0) at resolution r, plus pending skip tensors."""

    __slots__ = ("t", "y0", "x0", "r", "stack")

    def __init__(self, t, y0, x0, r, stack=None):
        self.t, self.y0, self.x0, self.r = t, y0, x0, r
        self.stack = stack or []

    def nbytes(self) -> int:
        uniq = {id(a): a for a in [self.t] + [s[0] for s in self.stack]}
        return sum(a.numel() * a.element_size() for a in uniq.values())


def _pads(st: _State, req, full) -> tuple[int, int, int, int]:
    """Zero-pad a side by one when it is a real image border or when its halo is used up (approximate mode)."""
    ry0, ry1, rx0, rx1 = req
    Hr, Wr = full
    h, w = st.t.shape[-2:]
    top = 1 if (st.y0 == 0 or st.y0 >= ry0) else 0
    bottom = 1 if (st.y0 + h == Hr or st.y0 + h <= ry1) else 0
    left = 1 if (st.x0 == 0 or st.x0 >= rx0) else 0
    right = 1 if (st.x0 + w == Wr or st.x0 + w <= rx1) else 0
    return left, right, top, bottom


def _conv3(conv, st: _State, req, full) -> _State:
    l, r_, t, b = _pads(st, req, full)
    x = st.t
    if (l, r_, t, b) == (1, 1, 1, 1):
        out = F.conv2d(x, conv.weight, conv.bias, padding=1)
    else:
        out = F.conv2d(F.pad(x, (l, r_, t, b)) if (l or r_ or t or b) else x, conv.weight, conv.bias)
    return _State(out, st.y0 - t + 1, st.x0 - l + 1, st.r, st.stack)


def _down(conv, st: _State, req, full) -> _State:
    x, y0, x0 = st.t, st.y0, st.x0
    if y0 % 2:
        x, y0 = x[..., 1:, :], y0 + 1
    if x0 % 2:
        x, x0 = x[..., :, 1:], x0 + 1
    h, w = x.shape[-2:]
    bottom = 1 if (y0 + h == full[0] or y0 + h <= req[1]) else 0
    right = 1 if (x0 + w == full[1] or x0 + w <= req[3]) else 0
    if bottom or right:
        x = F.pad(x, (0, right, 0, bottom))
    out = F.conv2d(x, conv.weight, conv.bias, stride=2)
    return _State(out, y0 // 2, x0 // 2, st.r // 2, st.stack)


def _receptive_halo(ops: Sequence[_Op], r_start: int) -> int:
    """Halo (latent px) that makes every position of a tile exact after ``ops`` (backward receptive field)."""
    h = 0
    for op in reversed(ops):
        if op.kind == "conv":
            h += 1
        elif op.kind == "up":
            h = math.ceil((h + 1) / 2)
        elif op.kind == "down":
            h = 2 * h + 2
    return math.ceil(h / r_start)


# ================================================================================================
# tiled VAE: the engine


class _Engine:
    def __init__(self, ops, grid: _Grid, r0: int, store_bytes: int, halo: int | None, progress: bool, desc: str,
                 store_device=None):
        self.ops, self.grid, self.r0 = ops, grid, r0
        self.store_bytes = None if store_bytes is None else max(0, int(store_bytes))  # None: auto_store_bytes in run
        self.store_device = None if store_device is None else torch.device(store_device)
        self.dev = None
        self.halo = halo
        self.stats: dict[int, tuple[Tensor, Tensor]] = {}
        # resolution after ops[:i] (channels: set by run() from the input)
        self.r_at = [r0]
        for op in ops:
            self.r_at.append(self.r_at[-1] * 2 if op.kind == "up" else self.r_at[-1] // 2 if op.kind == "down"
                             else self.r_at[-1])
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
        """The state on ``device`` (tensors shared between the activation and the skip stack stay shared)."""
        if device is None or st.t.device == device:
            return st
        moved = {}

        def mv(a):
            if id(a) not in moved:
                moved[id(a)] = a.to(device, non_blocking=device.type == "cuda")  # host->GPU only
            return moved[id(a)]
        return _State(mv(st.t), st.y0, st.x0, st.r, [(mv(a), y, x) for a, y, x in st.stack])

    def _forward(self, st: _State, i: int, j: int, tile) -> _State:
        g = self.grid
        for k in range(i, j):
            op = self.ops[k]
            r = st.r * (2 if op.kind == "up" else 1)
            req, full = g.region(tile, r), (g.H * r, g.W * r)
            if op.kind == "conv":
                st = _conv3(op.mod, st, req, full)
            elif op.kind == "up":
                st = _conv3(op.mod, _State(F.interpolate(st.t, scale_factor=2.0, mode="nearest"), 2 * st.y0,
                                           2 * st.x0, r, st.stack), req, full)
            elif op.kind == "down":
                st = _down(op.mod, st, req, full)
            elif op.kind == "push":
                st = _State(st.t, st.y0, st.x0, st.r, st.stack + [(st.t, st.y0, st.x0)])
            elif op.kind == "add":
                s, sy, sx = st.stack[-1]
                h, w = st.t.shape[-2:]
                dy, dx = st.y0 - sy, st.x0 - sx
                if dy < 0 or dx < 0 or dy + h > s.shape[-2] or dx + w > s.shape[-1]:
                    raise RuntimeError("tiled VAE: skip tensor does not cover the residual branch")
                s = s[..., dy:dy + h, dx:dx + w]
                if op.mod is not None:
                    s = F.conv2d(s, op.mod.weight, op.mod.bias)
                st = _State(s + st.t, st.y0, st.x0, st.r, st.stack[:-1])
            elif op.kind == "gn":
                scale, shift = self.stats[k]
                x = st.t
                y = (x.float() * scale[:, :, None, None] + shift[:, :, None, None]).to(x.dtype)
                st = _State(F.silu(y), st.y0, st.x0, st.r, st.stack)
            # "ckpt": no-op
        return st

    def _own(self, st: _State, tile) -> tuple[Tensor, Tensor, Tensor, tuple]:
        """The tile's region of ``st.t`` and its normalised weights."""
        req = self.grid.region(tile, st.r)
        h, w = st.t.shape[-2:]
        dy0, dy1, dx0, dx1 = req[0] - st.y0, req[1] - st.y0, req[2] - st.x0, req[3] - st.x0
        if dy0 < 0 or dx0 < 0 or dy1 > h or dx1 > w:
            raise RuntimeError("tiled VAE: tile lost its own region (internal error)")
        wy, wx = self.grid.weights(tile, st.r, st.t.device)
        return st.t[..., dy0:dy1, dx0:dx1], wy, wx, req

    def _accumulate(self, acc: list, st: _State, tile):
        """Add the tile's weighted per-channel sums of x and x^2 (float64) to ``acc``.

        Per tile: shift by the tile's own channel mean m (fp32), rows reduced against the x-weights in fp32 (short
        dot products), the rest in float64; then sum w x = sum w (x-m) + m sum w and
        sum w x^2 = sum w (x-m)^2 + 2 m sum w (x-m) + m^2 sum w, so there is no cancellation within a tile."""
        x, wy, wx, _ = self._own(st, tile)
        dt = wy.dtype
        B, C = x.shape[:2]
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
            acc[0][:, c0:c0 + step] += d1 + m * wsum
            acc[1][:, c0:c0 + step] += d2 + 2 * m * d1 + m * m * wsum

    def _finalize(self, k: int, acc, r: int):
        norm = self.ops[k].mod
        s1, s2 = acc
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
        self.stats[k] = (scale.float(), shift.float())

    def _map_bytes(self, i: int, ref: Tensor) -> int:
        r = self.r_at[i]
        return ref.shape[0] * self.c_at[i] * self.grid.H * r * self.grid.W * r * ref.element_size()

    # -- driver
    def run(self, src: Tensor) -> Tensor:
        ops = self.ops
        self.dev = src.device
        c = src.shape[1]
        self.c_at = [c := (op.mod.out_channels if op.kind in ("conv", "up", "down") else c) for op in [_Op("")] + ops]
        if self.store_bytes is None:  # auto: room for the largest level map as a checkpoint
            self.store_bytes = auto_store_bytes(max(self._map_bytes(i, src) for i in range(len(ops) + 1)))
        bounds = [0]
        for i, op in enumerate(ops):
            # a level map no larger than the (always stored) start map is free; others need half the store budget
            if op.kind == "ckpt" and self._map_bytes(i + 1, src) <= max(self.store_bytes // 2, self._map_bytes(0, src)):
                bounds.append(i + 1)
        bounds.append(len(ops))
        barriers_total = sum(op.kind == "gn" for op in ops)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=barriers_total + len(bounds) - 1, desc=self.desc)
        for n, (a, b) in enumerate(zip(bounds, bounds[1:])):
            inter = sum(self._map_bytes(j, src) for j in (a, b) if 0 < j < len(ops)
                        and self._map_bytes(j, src) > self._map_bytes(0, src))
            src = self._segment(a, b, src, max(0, self.store_bytes - inter), bar)
        if bar is not None:
            bar.close()
        return src

    def _segment(self, a: int, b: int, src: Tensor, keep_budget: int, bar) -> Tensor:
        g, r_a, r_b = self.grid, self.r_at[a], self.r_at[b]
        halo = _receptive_halo(self.ops[a:b], r_a)
        if self.halo is not None:
            halo = min(halo, int(self.halo))
        self.max_halo_used = max(self.max_halo_used, halo)
        kept: dict = {}
        kept_bytes = 0
        B = src.shape[0]
        adt = _acc_dtype(self.dev)
        for k in range(a, b):
            if self.ops[k].kind != "gn":
                continue
            C = self.c_at[k]
            acc = [torch.zeros(B, C, dtype=adt, device=self.dev) for _ in range(2)]
            for tile in g.tiles:
                i, st = kept.pop(tile, (a, None))
                if st is None:
                    st = self._crop(src, tile, halo, r_a)
                else:
                    kept_bytes -= st.nbytes()
                    st = self._move(st, self.dev)
                st = self._forward(st, i, k, tile)
                self._accumulate(acc, st, tile)
                nb = st.nbytes()
                if kept_bytes + nb <= keep_budget:
                    kept[tile] = (k, self._move(st, self.store_device))
                    kept_bytes += nb
                del st
            self._finalize(k, acc, self.r_at[k])
            self.sweeps += 1
            if bar is not None:
                bar.update(1)
        # final sweep: assemble the segment's output map with the feather weights
        out = None
        for tile in g.tiles:
            i, st = kept.pop(tile, (a, None))
            st = self._crop(src, tile, halo, r_a) if st is None else self._move(st, self.dev)
            st = self._forward(st, i, b, tile)
            x, wy, wx, (ry0, ry1, rx0, rx1) = self._own(st, tile)
            if out is None:
                adt_out = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
                out_dev = self.store_device if (b < len(self.ops) and self.store_device is not None) else x.device
                out = torch.zeros(B, x.shape[1], g.H * r_b, g.W * r_b, dtype=adt_out, device=out_dev)
            w2 = (wy[:, None] * wx[None, :]).to(adt_out)
            out[..., ry0:ry1, rx0:rx1] += (x.to(adt_out) * w2).to(out.device)
            del st, x
        self.sweeps += 1
        if bar is not None:
            bar.update(1)
        return out.to(self.dev if b == len(self.ops) else out.device, src.dtype)


# ================================================================================================
# mid block on the full map (chunked attention)


def _attn_chunk(n_tokens: int, attn_chunk: int | None, budget: int = 64 << 20) -> int:
    """Query chunk so that the fp32 logits and their softmax (2 x chunk x N x 4 bytes) stay within ``budget``.
    The sdpa backend never materialises the logits (its CPU / CUDA kernels work in blocks), so it gets chunks of
    1024 queries: 64-query chunks re-read all keys 16x as often (measured 1.5x slower at N = 16384, C = 512)."""
    if attn_chunk:
        return int(attn_chunk)
    from ..nn.attention import get_attention_backend
    if get_attention_backend() in ("auto", "sdpa", "triton"):  # no materialised logits
        return int(min(n_tokens, 1024))
    return int(max(64, min(n_tokens, budget // max(1, 8 * n_tokens))))


def _mid_attention(attn, x: Tensor, chunk: int) -> Tensor:
    """``MidAttention`` forward with the queries in chunks: ``sdup.nn.attention`` (the selected backend) on
    (B, 1, chunk, C) queries against all keys, so the math backend's logits are chunk x N, not N x N."""
    b, c, h, w = x.shape
    tokens = attn.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
    k = attn.k_proj(tokens)[:, None]
    v = attn.v_proj(tokens)[:, None]
    out = x.clone()
    flat = out.view(b, c, h * w)
    for s in range(0, h * w, chunk):
        q = attn.q_proj(tokens[:, s:s + chunk])[:, None]
        flat[:, :, s:s + chunk] += attn.out_proj(attention(q, k, v)[:, 0]).transpose(1, 2)
    return out


def _mid(mid, x: Tensor, attn_chunk: int | None) -> Tensor:
    x = mid.res1(x)
    x = _mid_attention(mid.attn, x, _attn_chunk(x.shape[-2] * x.shape[-1], attn_chunk))
    return mid.res2(x)


# ================================================================================================
# public VAE API


def _downscale(vae) -> int:
    cfg = getattr(vae, "cfg", None)
    if cfg is not None and hasattr(cfg, "ch_mult"):
        return 2 ** (len(cfg.ch_mult) - 1)
    return 2 ** sum(lv.upsample is not None for lv in vae.decoder.up)


DEFAULT_STORE_BYTES = 1 << 30
MAX_AUTO_STORE_BYTES = 4 << 30


def auto_store_bytes(largest_map_bytes: int) -> int:
    """The default ``store_bytes``: twice the largest level map (so every level can be a checkpoint and a GN sweep
    recomputes at most one ResBlock), at least ``DEFAULT_STORE_BYTES``, at most 4 GiB.  The x4 decoder to 2048^2
    (top map 128 x 2048^2 fp32 = 2 GiB) gets 4 GiB; with the old fixed 1 GiB its top two levels had no checkpoint
    and every sweep recomputed them from the 512^2 level (measured: 35 min instead of minutes)."""
    return int(min(MAX_AUTO_STORE_BYTES, max(DEFAULT_STORE_BYTES, 2 * largest_map_bytes)))



@torch.inference_mode()
def tiled_decode(vae, z: Tensor, tile=64, overlap=8, progress: bool = False, *, halo: int | None = None,
                 store_bytes: int | None = None, store_device=None,
                 attn_chunk: int | None = None) -> Tensor:
    """``vae.decode(z)`` with bounded memory and no seams (see the module docstring).

    z: (B, embed_dim, h, w), unscaled.  ``tile`` / ``overlap``: int or (h, w) in latent px; ``halo``: None = exact
    receptive field (the result equals ``vae.decode`` up to float rounding), an int = at most that many latent px
    (approximate, cheaper); ``store_bytes``: memory allowed for kept tile states and level checkpoints (None =
    ``auto_store_bytes``: twice the largest level map, 1..4 GiB; 0 = always
    recompute); ``store_device``: where they live (e.g. ``"cpu"`` while decoding on a GPU, as multidiffusion's Tiled
    VAE does: GPU memory then holds only the mid maps, the output and one tile); ``attn_chunk``: query chunk of the mid attention (default from a 256 MiB logits budget).
    """
    dec = vae.decoder
    for op in _decoder_ops(dec):
        if op.kind in ("conv", "up"):
            _check_conv3(op.mod)
    h = dec.conv_in(vae.post_quant_conv(z))
    h = _mid(dec.mid, h, attn_chunk)
    grid = _Grid(h.shape[-2], h.shape[-1], _pair(tile), _pair(overlap))
    eng = _Engine(_decoder_ops(dec), grid, 1, store_bytes, halo, progress, "tiled VAE decode", store_device)
    out = eng.run(h)
    # diagnostics of the last call (tiles, GN/assembly sweeps, largest halo in latent px), used by the tests
    tiled_decode.last_info = dict(tiles=len(grid.tiles), sweeps=eng.sweeps, halo=eng.max_halo_used)
    return out


@torch.inference_mode()
def tiled_encode(vae, image: Tensor, tile=512, overlap=32, progress: bool = False, *, halo: int | None = None,
                 store_bytes: int | None = None, store_device=None,
                 attn_chunk: int | None = None) -> DiagonalGaussian:
    """``vae.encode(image)`` with bounded memory: the encoder's conv / down path runs on pixel tiles (``tile``,
    ``overlap``: int or (h, w) in pixels, rounded down to multiples of the downscale factor f), the mid block,
    ``norm_out``, ``conv_out`` and ``quant_conv`` on the latent-resolution map.  H and W must be multiples of f.
    ``halo`` (latent px), ``store_bytes``, ``store_device``, ``attn_chunk``: as ``tiled_decode``."""
    f = _downscale(vae)
    H, W = image.shape[-2:]
    if H % f or W % f:
        raise ValueError(f"tiled_encode needs H and W divisible by {f}, got {H}x{W} (pad the image first)")
    enc = vae.encoder
    ops = _encoder_ops(enc)
    for op in ops:
        if op.kind in ("conv", "down"):
            _check_conv3(op.mod, 2 if op.kind == "down" else 1)
    th, tw = _pair(tile)
    oh, ow = _pair(overlap)
    grid = _Grid(H // f, W // f, (max(1, th // f), max(1, tw // f)), (oh // f, ow // f))
    eng = _Engine(ops, grid, f, store_bytes, halo, progress, "tiled VAE encode", store_device)
    h = eng.run(image)
    tiled_encode.last_info = dict(tiles=len(grid.tiles), sweeps=eng.sweeps, halo=eng.max_halo_used)
    h = _mid(enc.mid, h, attn_chunk)
    h = enc.conv_out(F.silu(enc.norm_out(h)))
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
    assumed (chunked logits are counted as 256 MiB at most).
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
