"""The one skeleton every pipeline runs on: ``prepare_<model>(...) -> Job``, ``sample(job)``, ``finish(job, latents)``.

    job = prepare_x4(model, image, "a white cat", steps=20)     # checks, text, noise, denoiser, grid, tile plan
    job.callback = lambda d: print(d["i"], float(d["x"].std()))  # a hook on every step
    job.sampler = get_sampler("euler"); ...                      # or another denoiser / grid (see ``Job``)
    latents = sample(job)                                        # one driver for every sampler and pipeline
    result = finish(job, latents)                                # decode, colour fix, crop, clamp, parameters

``upscale_x4``, ``upscale_latents_x2``, ``upscale_stablesr`` and ``txt2img`` are ``finish(sample(prepare(...)))``
under ``torch.inference_mode()``; ``prepare`` / ``sample`` / ``finish`` themselves leave autograd alone.

Classifier-free guidance, the one rule (``guided``): the unconditional half runs whenever the scale is not 1
(scale 0 = the unconditional output, 0 < scale < 1 interpolates towards it).  diffusers skips guidance for every
scale <= 1; ``guidance_rule="diffusers"`` (x2 only, where parity with diffusers' pipeline needs it) follows that.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..diffusion.samplers import Sampler, SamplerState
from ..tiling import TilePlan, plan_tiles
from .colorfix import COLOR_FIX_MODES, color_fix
from .result import Result, dtype_name

Tensor = torch.Tensor
GUIDANCE_RULES = ("sdup", "diffusers")


class NonFiniteResult(ValueError):
    """A run whose decoded image holds NaN / inf (``finish`` refuses to clamp it into a black image)."""


@dataclass(kw_only=True)
class Job:
    """Everything one sampler run needs, built by a ``prepare_<model>`` and free to inspect or change before
    ``sample``; built with keywords.  Contracts (``sdup.diffusion.samplers``): for a discrete sampler ``denoiser(x, t, **extra_args)``
    returns (eps, x0) and ``grid`` holds integer timesteps (None: the denoiser's whole chain, DDPM on a respaced
    chain); for a sigma sampler ``denoiser(x, sigma, **extra_args)`` returns D and ``grid`` the sigmas in visiting
    order.  A new grid for a sigma sampler usually wants ``init_scale = grid[0]``."""
    sampler: Sampler                    # the registry row whose function ``sample`` calls
    denoiser: Callable                  # the model in the sampler's contract (CFG, tiles and preconditioning inside)
    x_T: Tensor                         # start state before ``init_scale`` (unit-variance noise; StableSR: noised LR)
    grid: Tensor | None                 # timesteps or sigmas, visiting order
    extra_args: dict                    # forwarded to the denoiser at every call: dict(cond=..., uncond=...)
    init_scale: float = 1.0             # the sampler starts from x_T * init_scale (sigma samplers: sigma_max)
    options: dict = field(default_factory=dict)      # sampler keyword options (eta)
    generators: Any = None              # per-sample generators of the per-step noise
    callback: Callable[[dict], None] | None = None   # called after every step (see the samplers' docstring)
    progress: bool = True
    plan: TilePlan | None = None        # the tiles of the denoiser's network and of the decode (``finish`` records it)
    decode: Callable[[Tensor], Tensor] | None = None  # latents -> images in [-1, 1]; None: no images
    color_fix: str = "none"             # "none" | "adain" | "wavelet"
    color_ref: Tensor | Callable[[], Tensor] | None = None  # what the colours are matched to ([-1, 1]; lazy if callable)
    crop: tuple[int, int] | None = None  # keep the top-left (H, W) of the decoded image
    resize: tuple[int, int] | None = None  # then resize (bicubic, antialiased) to this size
    parameters: dict = field(default_factory=dict)   # what ``finish`` records


def sample(job: Job, state: SamplerState | None = None,
           on_step: Callable[[SamplerState], None] | None = None) -> Tensor:
    """Run ``job.sampler`` on ``job.denoiser`` from ``job.x_T * job.init_scale`` over ``job.grid``; float32 latents.
    ``state``: where to start (a ``SamplerState`` saved earlier; the job's generators restored to match) and what the
    sampler keeps current; ``on_step(state)``: called after every step, before ``job.callback`` (a checkpoint's
    save)."""
    x = job.x_T * job.init_scale if job.init_scale != 1 else job.x_T
    state = state if state is not None else SamplerState()
    callback = job.callback
    if on_step is not None:
        def callback(info: dict) -> None:
            on_step(state)
            if job.callback is not None:
                job.callback(info)
    return job.sampler.fn(job.denoiser, x, job.grid, extra_args=job.extra_args, generator=job.generators,
                          callback=callback, disable=not job.progress, state=state, **job.options).float()


def run(job: Job, group=None, checkpoint=None) -> Result:
    """``finish(job, sample(job))``. ``group`` (``sdup.distributed.Group``, e.g. ``from_environment()`` under torchrun):
    the latent tiles of every step and the tiled VAE decode are split over its ranks (``distributed.using``), and
    every rank gets the single-process result.  ``checkpoint`` (``sdup.pipelines.resume.Checkpoint``): start from
    its saved state when it fits the job, and save as the steps go."""
    from ..distributed import using
    with using(group):
        if checkpoint is None:
            return finish(job, sample(job))
        return finish(job, sample(job, checkpoint.start(job), checkpoint.step))


def finish(job: Job, latents: Tensor) -> Result:
    """Decode, colour fix, crop, resize and clamp to [0, 1]; the parameters with the sampler and grid actually run."""
    images = None
    if job.decode is not None:
        out = job.decode(latents)
        if job.color_fix != "none":
            out = color_fix(out, job.color_ref() if callable(job.color_ref) else job.color_ref, job.color_fix)
        if job.crop is not None:
            out = out[..., : job.crop[0], : job.crop[1]]
        if job.resize is not None and tuple(out.shape[-2:]) != tuple(job.resize):
            out = F.interpolate(out, size=job.resize, mode="bicubic", align_corners=False, antialias=True)
        if not torch.isfinite(out).all():  # clamped, NaN would become a black image written with exit code 0
            raise NonFiniteResult("the upscaled image holds NaN / inf values: the sampling diverged (a guidance "
                                  "scale or noise level too large for this model?); nothing written")
        images = ((out + 1) / 2).clamp(0, 1)
    params = dict(job.parameters, sampler=job.sampler.name)
    if job.plan is not None and job.plan.parameters() is not None:
        params["tiling"] = job.plan.parameters()
    if not job.sampler.discrete and job.grid is not None:
        params["sigmas"] = [round(float(s), 6) for s in job.grid]
    return Result(images=images, latents=latents.float().cpu(), parameters=params)


# ------------------------------------------------------------------------------------------------
# pieces the prepare functions share


def guided(scale: float, rule: str = "sdup") -> bool:
    """Whether classifier-free guidance runs (the unconditional half): see the module docstring."""
    if rule not in GUIDANCE_RULES:
        raise ValueError(f"guidance_rule must be one of {GUIDANCE_RULES}, got {rule!r}")
    return scale > 1 if rule == "diffusers" else scale != 1


def check_color_fix(mode: str) -> str:
    if mode not in COLOR_FIX_MODES:
        raise ValueError(f"unknown colour fix {mode!r} (choose from {', '.join(COLOR_FIX_MODES)})")
    return mode


def tile_plan(plan: TilePlan | None, latent: tuple[int, int], tile: int | None, overlap: int, vae_tile: int | None,
              vae_overlap: int, multiple: int, **blend) -> TilePlan:
    """The job's ``TilePlan``: ``plan`` when given (it must be for this latent), else ``plan_tiles`` of the keyword
    sizes (the tile rounded down to ``multiple``, the network's downsampling; the overlap kept below the tile)."""
    latent = (int(latent[0]), int(latent[1]))
    if plan is None:
        return plan_tiles(latent, tile, overlap, vae_tile, vae_overlap, multiple, **blend)
    if tuple(plan.latent) != latent or (plan.tile and plan.tile % multiple):
        raise ValueError(f"the tile plan is for a {plan.latent[0]}x{plan.latent[1]} latent in multiples of "
                         f"{plan.multiple}; this job runs on {latent[0]}x{latent[1]} in multiples of {multiple}")
    return plan


def start_noise(x_T: Tensor | None, shape: tuple, generators, device, what: str = "") -> Tensor:
    """The unit-variance start noise: ``x_T`` checked against ``shape``, or drawn from the generators."""
    from ..diffusion.samplers import randn
    if x_T is None:
        x_T = randn(shape, generators)
    elif tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T must have shape {tuple(shape)}{what}, got {tuple(x_T.shape)}")
    return x_T.float().to(device)


def base_parameters(pipeline: str, model, steps: int, guidance: float, batch: int) -> dict:
    """The parameters every pipeline records first."""
    from .. import __version__
    return {"pipeline": pipeline, "sdup_version": __version__, "model": str(model.source), "family": model.family,
            "steps": steps, "guidance": float(guidance), "batch_size": batch,
            "dtype": dtype_name(next(model.unet.parameters()).dtype)}
