"""``TilePlan``: how one input is tiled, decided once and used everywhere.

A plan holds the diffusion latent's size, the latent tile (rounded down to the UNet's multiple) and its overlap
(kept below the tile), the VAE tile and its overlap, the tile counts and, when the command line built it, the
peak-memory estimate.  ``--dry-run`` prints it, ``prepare_*`` wraps the network with ``plan.wrap`` and decodes with
its VAE tiles, and ``finish`` records ``plan.parameters()`` as the output's ``tiling``.

    plan = plan_tiles((96, 128), tile=64, overlap=16, vae_tile=64, vae_overlap=8, multiple=8)
    plan.latent_tiles, plan.vae_tiles    # 2 x 3 = 6 each
    net = plan.wrap(net)                 # TiledModel(net, 64, 16), or net itself when untiled

``plan_tiles`` takes the sizes as given (the library's ``tile=`` / ``vae_tile=`` arguments); ``default_plan`` is
the command line's policy: tiling switches on above an upscaler's ``TileDefaults``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from .latent import TiledModel, tile_grid


@dataclass(frozen=True)
class TileDefaults:
    """An upscaler's tiling when the command line gives no sizes: latent tiles of ``tile`` (when the latent is
    larger) with overlap ``min(overlap, tile // overlap_share)``; VAE tiles of ``vae_tile`` (when larger) with
    overlap ``min(vae_overlap, vae_tile // 4)``; ``tile_batch`` / ``weights``: ``TiledModel``'s, recorded when set."""
    tile: int = 128
    overlap: int = 32
    overlap_share: int = 4
    vae_tile: int = 128
    vae_overlap: int = 8
    tile_batch: int | None = None
    weights: str | None = None


def tiles_along(size: int, tile: int | None, overlap: int) -> list[int]:
    """Tile starts along one axis of ``size`` (one tile, shrunk to the size, when ``tile`` is None or covers it)."""
    return tile_grid(size, min(tile, size), overlap) if tile else [0]


@dataclass(frozen=True)
class TilePlan:
    """The tiling of one input (latent px throughout; None / 0: untiled)."""
    latent: tuple[int, int]           # (h, w) of the diffusion latent
    tile: int | None = None           # latent tile side, a multiple of ``multiple``
    overlap: int = 0
    vae_tile: int | None = None       # ``tiled_decode`` tile side
    vae_overlap: int = 0
    multiple: int = 1                 # the UNet's downsampling: tiles are multiples of it
    tile_batch: int | None = None     # tiles per model call (None: 1, not recorded)
    weights: str | None = None        # blend weights (None: "symmetric", not recorded)
    peak_bytes: int | None = None     # estimated peak memory (``with_memory``)

    @property
    def latent_tiles(self) -> int:
        h, w = self.latent
        return len(tiles_along(h, self.tile, self.overlap)) * len(tiles_along(w, self.tile, self.overlap))

    @property
    def vae_tiles(self) -> int:
        h, w = self.latent
        along = [tiles_along(n, self.vae_tile, self.vae_overlap) for n in (h, w)]
        return len(along[0]) * len(along[1])

    def wrap(self, net: Callable, progress: bool = False):
        """``TiledModel`` around ``net`` on this plan's latent tiles; ``net`` itself when untiled."""
        if not self.tile:
            return net
        blend = {k: v for k, v in (("tile_batch", self.tile_batch), ("weights", self.weights)) if v is not None}
        return TiledModel(net, tile=self.tile, overlap=self.overlap, progress=progress, **blend)

    def parameters(self) -> dict | None:
        """The ``tiling`` entry of an output's parameters (None: nothing tiled)."""
        if not self.tile and not self.vae_tile:
            return None
        out = {"tile": self.tile, "overlap": self.overlap if self.tile else None, "vae_tile": self.vae_tile,
               "vae_overlap": self.vae_overlap if self.vae_tile else None}
        if self.tile and self.tile_batch is not None:
            out.update(tile_batch=self.tile_batch, weights=self.weights)
        return out

    def with_memory(self, estimate: Callable[["TilePlan"], int]) -> "TilePlan":
        """This plan with ``peak_bytes = estimate(plan)``."""
        return dataclasses.replace(self, peak_bytes=int(estimate(self)))


def round_tile(tile: int, multiple: int) -> int:
    """``tile`` rounded down to a multiple of ``multiple``, at least one multiple (0 stays 0: untiled)."""
    return max(multiple, tile - tile % multiple) if tile else 0


def plan_tiles(latent: tuple[int, int], tile: int | None = None, overlap: int = 32, vae_tile: int | None = None,
               vae_overlap: int = 8, multiple: int = 1, **blend) -> TilePlan:
    """The plan of the given sizes: the tile rounded down to a multiple of ``multiple`` (at least one multiple), the
    overlap kept below the tile (at most ``tile - multiple``); ``tile`` / ``vae_tile`` None or 0: untiled."""
    t = round_tile(tile, multiple) or None
    return TilePlan(latent=(int(latent[0]), int(latent[1])), tile=t, overlap=min(overlap, t - multiple) if t else 0,
                    vae_tile=vae_tile or None, vae_overlap=vae_overlap if vae_tile else 0, multiple=multiple, **blend)


def default_plan(latent: tuple[int, int], defaults: TileDefaults, multiple: int, tile: int | None = None,
                 overlap: int | None = None, vae_tile: int | None = None) -> TilePlan:
    """The command line's plan: given sizes as given (0 = off), missing ones from ``defaults`` where the latent is
    larger than their tile."""
    side = max(latent)
    if tile is None:
        tile = defaults.tile if side > defaults.tile else 0
    if vae_tile is None:
        vae_tile = defaults.vae_tile if side > defaults.vae_tile else 0
    if overlap is None:
        overlap = min(defaults.overlap, round_tile(tile, multiple) // defaults.overlap_share)
    return plan_tiles(latent, tile, overlap, vae_tile, min(defaults.vae_overlap, vae_tile // 4), multiple,
                      tile_batch=defaults.tile_batch, weights=defaults.weights)
