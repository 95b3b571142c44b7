"""``Upscaler``: everything the command line needs to know about one upscaling model, in one record.

Each ``pipelines/<model>.py`` ends with its record; ``sdup.pipelines.registry.UPSCALERS`` collects them, as
``sdup.diffusion.samplers.SAMPLERS`` collects the samplers.  The command line (``sdup/cli/``), its dry run,
``--rerun``, ``--skip-existing`` and the torchrun loop read a model's name, scale, defaults, checks, sizes, tiles,
memory model and extra components from here, so a new upscaler is one new file plus one row of the table.

The callables, with ``model`` a ``LoadedModel`` (or one built on the meta device for the dry run):

* ``settings(opts)``: the command line's options (an ``argparse.Namespace``) -> the keyword arguments of the
  model's options (its ``Defaults`` filling what was not given); a ValueError for an option it does not take.
* ``check_options(model, **settings)``: the pipeline's own check (``model`` None: before loading); returns None.
* ``job(model, image=, latents=, plan=, **settings, **common)``: the ``Job`` of one input (``sdup.pipelines.job``).
* ``min_side(model)``: the smallest input side in pixels; ``latent_size(model, (h, w), latent, scale, settings)``:
  the latent the diffusion runs on (``latent``: a latents file's low-res latent, else None);
  ``tile_multiple(model)``: latent tiles are multiples of it.
* ``unet_bytes(cfg, th, tw, batch, bytes_per_value)``: its UNet's memory model (``sdup.tiling.memory``).
* ``attach(model, opts, load)``: adds the extra components (``--vae``) after loading, ``load(path)`` loading a
  checkpoint; a ValueError names what is wrong.  None: the model takes no ``--vae``.
* ``read_latents(path)``: (latents, metadata) of a latents file, for a model that upscales latents; else None.
* ``meta_model()``: the model on the meta device from its official configuration (the weight-less dry run), when
  that configuration is in the code rather than a YAML in configs/ (``official_config``).
* ``describe(settings)``: the dry run's words for its own settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..tiling.plan import TileDefaults


@dataclass(frozen=True)
class Upscaler:
    name: str                            # --model NAME, and what messages call it ("the x4 upscaler")
    family: str                          # the checkpoint family it loads (sdup.checkpoints.detect)
    title: str                           # how a message about its own options names it
    scale: float                         # output size / input size
    defaults: Any                        # the pipeline's Defaults
    settings: Callable[[Any], dict]
    check_options: Callable[..., None]
    job: Callable[..., Any]
    min_side: Callable[[Any], int]
    latent_size: Callable[..., tuple[int, int]]
    tile_multiple: Callable[[Any], int]
    unet_bytes: Callable[..., int]
    describe: Callable[[dict], str]
    expected_files: str                  # what to download, for the message about missing weights
    tiles: TileDefaults = TileDefaults()
    color_fix: str = "none"              # the default --color-fix
    variable_scale: bool = False         # --scale sets the scale
    own_options: tuple[str, ...] = ()    # options (argparse dests) that only this upscaler takes
    attach: Callable[..., None] | None = None
    read_latents: Callable[[Any], tuple] | None = None
    official_config: str | None = None   # YAML in configs/ for the weight-less dry run
    config_hint: str | None = None       # the upstream YAML to pass as --config when there is no official one
    meta_model: Callable[[], Any] | None = None

    def loads(self, family: str) -> bool:
        """Whether checkpoints of ``family`` (``sdup.checkpoints.detect``) are this upscaler's weights."""
        return self.family == family
