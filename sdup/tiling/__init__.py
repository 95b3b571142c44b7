"""Tiling: latent tiles for the diffusion model (any sampler), the exact tiled VAE, and the plan that decides both
(docs/tiling.md).

* ``latent``: ``tile_grid`` / ``gaussian_weights`` (StableSR's canvas) and ``TiledModel``, a drop-in for a model
  callable that runs it on overlapping latent tiles and blends the outputs.
* ``engine`` + ``vae``: ``tiled_decode`` / ``tiled_encode``, ``vae.decode`` / ``vae.encode`` with bounded memory
  and no seams (the VAE's own stages on tiles, whole-image GroupNorm statistics, chunked mid-block attention).
* ``plan``: ``TilePlan``, the tiles of one input (latent and VAE), built once and used by the dry run, the pipelines
  and the recorded parameters; ``memory``: the peak-memory estimates it carries.
"""
from .latent import TiledModel, gaussian_weights, tile_grid
from .memory import estimate_peak_bytes, estimate_vae_bytes
from .plan import TileDefaults, TilePlan, default_plan, plan_tiles
from .vae import tiled_decode, tiled_encode

__all__ = ["tile_grid", "gaussian_weights", "TiledModel", "tiled_decode", "tiled_encode", "estimate_vae_bytes",
           "estimate_peak_bytes", "TilePlan", "TileDefaults", "plan_tiles", "default_plan"]
