"""The tiled VAE engine: a VAE's own stages run on latent tiles with their exact receptive field, every GroupNorm
with the statistics of the whole image (docs/tiling.md).  ``sdup.tiling.vae`` is its public face."""
from __future__ import annotations

import functools
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import exchange_tensors, shard
from ..nn import Downsample, ResBlock, Upsample
from .latent import _acc_dtype, tile_grid

Tensor = torch.Tensor


DEFAULT_STORE_BYTES = 1 << 30
MAX_AUTO_STORE_BYTES = 4 << 30


def auto_store_bytes(largest_map_bytes: int) -> int:
    """The default ``store_bytes``: twice the largest level map (so every level can be a checkpoint and a GroupNorm
    sweep recomputes at most one stage), at least ``DEFAULT_STORE_BYTES``, at most ``MAX_AUTO_STORE_BYTES``."""
    return int(min(MAX_AUTO_STORE_BYTES, max(DEFAULT_STORE_BYTES, 2 * largest_map_bytes)))



# ================================================================================================
# the stages


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
