"""stable-diffusion-x4-upscaler: text-guided 4x super-resolution (v-prediction, pixel-space low-res concat).

    model = sdup.load("x4-upscaler-ema.safetensors")
    out = upscale_x4(model, low_res, "a white cat", noise_level=20, steps=75, guidance=9.0, seed=42)
    out.images      # (B, 3, 4h, 4w) in [0, 1]
    out.latents     # (B, 4, h', w') sampler output in the UNet's latent space (h', w' = the padded low-res size)
    out.parameters  # everything needed to reproduce the run

What it computes (Stability-AI ``scripts/gradio/superresolution.py`` / diffusers ``StableDiffusionUpscalePipeline``):

1. The low-res image (B, 3, h, w) is mapped to [-1, 1]; if h or w is not a multiple of the UNet's downsampling
   factor 2**(levels-1) (8 for the real model, 2 for the tiny test model) it is padded on the bottom / right
   (``pad_mode``: "replicate" = edge, the mode of the gradio reference, or "reflect") and the output is cropped
   back to exactly 4h x 4w.  ``pad_mode=None`` instead raises a ValueError naming the required multiple.
   (The references differ here: gradio pads to a multiple of 64, at least 128; diffusers bicubic-resizes to a
   multiple of 4 and lets its UNet interpolate odd skip sizes.  For sizes that are already multiples of the
   factor sdup equals diffusers.)
2. Noise augmentation with its OWN schedule (``low_scale_model``: LDM "linear" betas = linear in sqrt(beta),
   ``noise_linear_start`` .. ``noise_linear_end``, 1000 steps):
   x_aug = sqrt(ac'[n]) x + sqrt(1 - ac'[n]) e, n = ``noise_level`` (0 .. ``max_noise_level`` = 350; note that
   n = 0 still mixes in sqrt(beta_0) = 1% noise, as upstream).  n=20 -> (0.99865, 0.05195).
3. Latent x_T ~ N(0, I) of shape (B, 4, h, w) -- the latent has the LOW-res size, the f=4 VAE makes it 4x.
   Random numbers: one generator per sample (seed + i), each drawing first its augmentation noise e, then its
   x_T, then any per-step noise -- the order of diffusers, so ``seed=s`` equals diffusers with
   ``generator=[torch.Generator().manual_seed(s + i) for i in range(B)]``.
4. Each step: UNet input = cat([latent (4 ch), x_aug (3 ch)], dim=1) (latent FIRST), class label y = noise level,
   context = text embeddings; the v output is guided: v = v_u + g (v_c - v_u) with ONE batched UNet call on
   [uncond, cond] -- the unconditional half shares x_aug and the noise level, only the text changes
   (negative prompt, default "").  DDIM is the reference sampler (v-parameterisation, LDM timesteps
   ``i * (1000 // steps) + 1``, final alpha ac[0]); the other sdup samplers run on the same v network.
5. image = clamp((VAE.decode(z / scale_factor) + 1) / 2, 0, 1), scale_factor 0.08333, the VAE run in fp32
   (the x4 VAE overflows in half precision) even when the UNet is fp16 / bf16; optional colour fix against the
   low-res input (``colorfix.color_fix``) before the clamp.

Reference defaults: diffusers steps 75, guidance 9.0, noise_level 20, eta 0 (sdup's defaults); SAI gradio demo
steps 75, guidance 10; SAI streamlit demo steps 50, guidance 9.  Guidance 1 runs the conditional half only
(diffusers also skips guidance for any scale <= 1; sdup applies the formula for every scale != 1).
Memory: the f=4 VAE decoder's mid-block attention runs over all h*w latent positions ((h*w)^2 scores: a 512x512
input gives 262144 positions), so large inputs need ``vae_tile`` (``tiling.tiled_decode``, exact) and ``tile``
(the UNet on latent tiles, ``tiling.TiledModel``).
Step by step: ``job = prepare_x4(...)``, ``latents = sample(job)``, ``finish(job, latents)`` (``sdup.pipelines.job``).

Arguments of ``prepare_x4`` (and of the wrapper, which takes the same):
    image: (B, 3, h, w) / (3, h, w) float tensor in [0, 1] (``image_range=(-1, 1)`` for [-1, 1] input), a PIL
        image, or a list of those; RGB only (an alpha channel raises ValueError).
    prompt / negative_prompt: a string (shared), one string per image, or token ids ((L,) / (B, L) int tensor or
        lists, start/end tokens included -- needed for encoders without a BPE tokenizer). "" = no text.
    prompt_embeds / negative_embeds: precomputed text-encoder contexts (77, D) or (B, 77, D) instead of text
        (``conditioning.check_prompts``: the one rule of every pipeline).
    noise_level: low-res noise augmentation level, 0..max_noise_level (350), int or one per image. More noise
        = the model invents more detail and follows the input less.
    steps, sampler, guidance, eta: as in ``txt2img`` (ddim | plms | ddpm | euler | euler_a | lms | dpmpp_2m);
        guidance is applied to the v output; 1 disables it.
    seed / generator: per-image seeds (seed + i) or torch generators (see step 3 of the module docstring).
    x_T: start latent (B, 4, h', w') with unit variance, aug_noise: augmentation noise (B, 3, h', w'), both at the
        padded size h', w' (= h, w when no padding is needed); given ones are not drawn.
    pad_mode: "replicate" (default) / "reflect" padding to the UNet's multiple, or None to require it.
    color_fix_mode: "none" | "adain" | "wavelet": match the output's colours to the (un-augmented) low-res input.
    tile, tile_overlap: run the UNet on overlapping latent tiles (``tiling.TiledModel`` under CFG; the tile is rounded
        down to the UNet's multiple); vae_tile, vae_overlap: decode with ``tiling.tiled_decode``. Same random numbers;
        a tile covering the latent gives the untiled result.  plan: a ``tiling.TilePlan`` for the padded latent
        instead of these four (the command line's, built once per input).
    callback: called after every step with dict(i, t, sigma, x, x0_pred) (latents at the padded size).
    ``upscale_x4`` = ``finish(job, sample(job))``: ``Result(images (B, 3, 4h, 4w) in [0, 1], latents, parameters)``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch

from ..diffusion.denoisers import CFG
from ..diffusion.grids import ldm_grid
from ..diffusion.samplers import SAMPLER_NAMES, get_sampler, randn
from ..diffusion.schedules import ldm_buffers, ldm_linear_betas, q_sample
from ..tiling import TilePlan
from ..tiling.memory import ldm_unet_bytes
from .checks import check_guidance, check_images, check_steps, pad_to_multiple
from .conditioning import check_prompts, record_prompts, text_contexts
from .decoding import decode_scaled, recorded_dtype
from .job import Job, base_parameters, check_color_fix, guided, run, start_noise, tile_plan
from .result import Result
from .seeds import resolve_generators
from .upscaler import Upscaler

Tensor = torch.Tensor
SAMPLERS = SAMPLER_NAMES   # every sampler of the registry runs on the x4 v network


@dataclass(frozen=True)
class Defaults:
    """diffusers' values, sdup's defaults (Stability's demos: gradio steps 75 / guidance 10, streamlit steps 50 /
    guidance 9; both noise level 20, eta 0)."""
    steps: int = 75
    guidance: float = 9.0
    noise_level: int = 20
    sampler: str = "ddim"
    eta: float | None = None   # the sampler's own: ddim 0, euler_a 1


DEFAULTS = Defaults()


# ------------------------------------------------------------------------------------------------
# building blocks (public: the tests and the tiled variant use them)


@lru_cache(maxsize=8)
def _low_res_buffers(start: float, end: float, T: int) -> dict:
    return ldm_buffers(ldm_linear_betas(start, end, T))


def low_res_buffers(schedule: dict) -> dict[str, Tensor]:
    """The 8(+4) ``low_scale_model`` buffers of the noise augmentation (float32, LDM "linear" betas)."""
    return _low_res_buffers(float(schedule.get("noise_linear_start", 0.0001)),
                            float(schedule.get("noise_linear_end", 0.02)), int(schedule.get("noise_timesteps", 1000)))


def max_noise_level(model=None) -> int:
    """The largest noise_level (350 for the official model; None: that default)."""
    return int(model.schedule.get("max_noise_level", 350)) if model is not None else 350


def noise_augment(image: Tensor, noise_level, noise: Tensor, schedule: dict) -> Tensor:
    """``ImageConcatWithNoiseAugmentation``: sqrt(ac'[n]) image + sqrt(1 - ac'[n]) noise (image in [-1, 1];
    ``noise_level`` an int or (B,) ints)."""
    n = torch.as_tensor(noise_level, dtype=torch.long)
    n = n.reshape(-1).expand(image.shape[0]) if n.numel() == 1 else n
    return q_sample(image, n, noise, low_res_buffers(schedule))


def unet_input(latent: Tensor, x_aug: Tensor) -> Tensor:
    """The 7-channel UNet input: latent first, then the augmented low-res image ("hybrid-adm" ``c_concat``)."""
    return torch.cat([latent, x_aug.to(latent.dtype)], dim=1)


def x4_network(unet) -> Callable:
    """Raw v network for the samplers: ``net(x, t, context, concat, y)``; the sampler state stays fp32 while the
    UNet runs in its own dtype / device."""
    p = next(unet.parameters())

    def net(x: Tensor, t: Tensor, context: Tensor, concat: Tensor, y: Tensor) -> Tensor:
        h = unet_input(x, concat)
        return unet(h.to(p.device, p.dtype), t.to(p.device), context.to(p.device, p.dtype), y=y.to(p.device)).float()
    return net


def unet_multiple(model) -> int:
    """Low-res sizes must be multiples of this (the UNet halves the latent levels-1 times)."""
    cfg = getattr(model.unet, "cfg", None)
    return 2 ** (len(cfg.channel_mult) - 1) if cfg is not None else 8


def decode(model, latents: Tensor, vae_tile: int | None = None, vae_overlap: int = 8, progress: bool = False,
           vae_dtype: torch.dtype = torch.float32) -> Tensor:
    """Scaled latents (B, 4, h, w) -> images (B, 3, 4h, 4w) in [-1, 1] (not clamped), float32 on the CPU: the model's
    VAE in fp32 by default (``decoding.decode_scaled``; the x4 VAE overflows in half precision: a non-finite fp16
    decode is redone in fp32)."""
    return decode_scaled(model.vae, latents, model.scale_factor, vae_tile=vae_tile, vae_overlap=vae_overlap,
                         progress=progress, vae_dtype=vae_dtype)


def _noise_levels(noise_level, batch: int, top: int) -> Tensor:
    """int or one int per sample -> (B,) int64, each in 0..top."""
    if isinstance(noise_level, Tensor):
        if noise_level.is_floating_point() or noise_level.is_complex():
            raise ValueError(f"noise_level must be an integer (0..{top}), got a {noise_level.dtype} tensor")
        values = noise_level.reshape(-1).tolist()
    elif isinstance(noise_level, (list, tuple)):
        values = list(noise_level)
    else:
        values = [noise_level]
    out = []
    for v in values:
        try:
            if isinstance(v, bool):
                raise TypeError
            v = operator.index(v)
        except TypeError:
            raise ValueError(f"noise_level must be an integer in 0..{top}, got {v!r}") from None
        if not 0 <= v <= top:
            raise ValueError(f"noise_level must be an integer in 0..{top} (the model's max_noise_level), got {v}")
        out.append(v)
    if len(out) == 1:
        out = out * batch
    if len(out) != batch:
        raise ValueError(f"got {len(out)} noise levels for a batch of {batch}")
    return torch.tensor(out, dtype=torch.long)


def _check_model(model) -> None:
    if model.family != "x4" or model.unet is None or model.vae is None:
        raise ValueError(f"upscale_x4 needs a stable-diffusion-x4-upscaler checkpoint (UNet + VAE), "
                         f"{model.source} is a {model.family} model")
    if model.prediction not in ("eps", "v"):
        raise ValueError(f"unsupported prediction type {model.prediction!r} (the x4 upscaler predicts v)")
    ucfg = getattr(model.unet, "cfg", None)
    vcfg = getattr(model.vae, "cfg", None)
    if ucfg is not None and vcfg is not None and ucfg.in_channels != vcfg.embed_dim + 3:
        raise ValueError(f"UNet takes {ucfg.in_channels} channels, expected {vcfg.embed_dim} latent + 3 image")


# ------------------------------------------------------------------------------------------------
# the pipeline: prepare_x4 -> job.sample -> job.finish


def prepare_x4(model, image, prompt: str | Sequence[str] | Tensor | None = "",
               negative_prompt: str | Sequence[str] | Tensor = "",
               *, prompt_embeds: Tensor | None = None, negative_embeds: Tensor | None = None,
               noise_level: int | Sequence[int] | Tensor = DEFAULTS.noise_level, steps: int = DEFAULTS.steps,
               sampler: str = DEFAULTS.sampler,
               guidance: float = DEFAULTS.guidance, eta: float | None = None, seed: int | Sequence[int] | None = 42,
               generator: torch.Generator | Sequence[torch.Generator] | None = None,
               x_T: Tensor | None = None, aug_noise: Tensor | None = None, image_range=(0, 1),
               pad_mode: str | None = "replicate", color_fix_mode: str = "none", tile: int | None = None,
               tile_overlap: int = 32, vae_tile: int | None = None, vae_overlap: int = 8,
               plan: TilePlan | None = None, vae_dtype: torch.dtype = torch.float32,
               callback: Callable[[dict], None] | None = None, progress: bool = True) -> Job:
    """The x4 ``Job`` for low-res images and a stable-diffusion-x4-upscaler ``LoadedModel``: the arguments are in
    the module docstring; ``upscale_x4`` = ``finish(job, sample(job))``."""
    check_options(model, sampler=sampler, steps=steps, guidance=guidance, eta=eta, noise_level=noise_level,
                  color_fix_mode=color_fix_mode)
    spec = get_sampler(sampler)
    eta = spec.resolve_eta(eta)
    prompts = check_prompts(prompt, negative_prompt, prompt_embeds, negative_embeds)
    low = check_images(image, image_range)                  # (B, 3, h, w) in [-1, 1]
    batch, (h, w) = low.shape[0], tuple(low.shape[-2:])
    levels = _noise_levels(noise_level, batch, max_noise_level(model))
    padded, (ph, pw) = pad_to_multiple(low, unet_multiple(model), pad_mode, "low-res image")
    seeds, generators = resolve_generators(seed, generator, batch)
    device = next(model.unet.parameters()).device
    x_aug, x_T = _start(model, padded, levels, generators, aug_noise, x_T, device)
    cond, uncond = text_contexts(model, prompts, batch, guided(guidance), device)
    cond.update(concat=x_aug, y=levels.to(device))
    plan = tile_plan(plan, padded.shape[-2:], tile, tile_overlap, vae_tile, vae_overlap, unet_multiple(model))
    net = plan.wrap(x4_network(model.unet), progress)
    den, grid, init_scale, record = ldm_grid(spec, CFG(net, float(guidance)), model.schedule, model.prediction, steps,
                                             device)
    params = base_parameters("x4", model, steps, guidance, batch)
    params.update(prediction=model.prediction, eta=eta, input_size=[h, w], output_size=[4 * h, 4 * w],
                  scale_factor=model.scale_factor, color_fix=color_fix_mode,
                  vae_dtype=recorded_dtype(model.vae, vae_dtype, plan.vae_tile))
    lv = levels.tolist()
    params.update({"noise_level": lv[0]} if len(set(lv)) == 1 else {"noise_levels": lv})
    if ph or pw:
        params["padding"] = {"mode": pad_mode, "bottom": ph, "right": pw}
    record_prompts(params, prompts, batch, guidance, seeds)
    params.update(record)
    return Job(sampler=spec, denoiser=den, x_T=x_T, grid=grid, extra_args=dict(cond=cond, uncond=uncond),
               init_scale=init_scale, options=spec.options(eta), generators=generators, callback=callback,
               progress=progress, plan=plan,
               decode=lambda z: decode(model, z, plan.vae_tile, plan.vae_overlap, progress, vae_dtype)[..., : 4 * h, : 4 * w],
               color_fix=color_fix_mode, color_ref=low, parameters=params)


def check_options(model=None, *, sampler: str = DEFAULTS.sampler, steps: int = DEFAULTS.steps,
                  guidance: float = DEFAULTS.guidance, eta: float | None = None,
                  noise_level: int | Sequence[int] | Tensor = DEFAULTS.noise_level, color_fix_mode: str = "none"):
    """The options that need no image checked (ValueError); ``prepare_x4`` and the CLI (before loading any weights:
    ``model`` None) use it."""
    if model is not None:
        _check_model(model)
    get_sampler(sampler).resolve_eta(eta)
    check_steps(steps)
    check_guidance(guidance)
    check_color_fix(color_fix_mode)
    count = noise_level.numel() if isinstance(noise_level, Tensor) else \
        len(noise_level) if isinstance(noise_level, (list, tuple)) else 1
    _noise_levels(noise_level, count, max_noise_level(model))


def _start(model, padded: Tensor, levels: Tensor, generators, aug_noise, x_T, device) -> tuple[Tensor, Tensor]:
    """(x_aug, x_T): the noise-augmented low-res image and the start latent, drawn in diffusers' order (per
    generator: augmentation noise first, then x_T) unless given."""
    if aug_noise is None:
        aug_noise = randn(padded.shape, generators)
    elif tuple(aug_noise.shape) != tuple(padded.shape):
        raise ValueError(f"aug_noise must have shape {tuple(padded.shape)} (the padded low-res size), got "
                         f"{tuple(aug_noise.shape)}")
    channels = model.vae.cfg.embed_dim if hasattr(model.vae, "cfg") else 4
    shape = (padded.shape[0], channels, *padded.shape[-2:])
    x_T = start_noise(x_T, shape, generators, device, " (latent = padded low-res size)")
    return noise_augment(padded, levels, aug_noise.float().cpu(), model.schedule).to(device), x_T


@torch.inference_mode()
def upscale_x4(model, image, prompt: str | Sequence[str] | Tensor | None = "",
               negative_prompt: str | Sequence[str] | Tensor = "", *, group=None, **options) -> Result:
    """Upscale low-res images 4x: ``finish(job, sample(job))`` of ``prepare_x4`` (same arguments) under
    ``torch.inference_mode()``.  Returns ``Result(images (B, 3, 4h, 4w) in [0, 1], latents, parameters)``."""
    job = prepare_x4(model, image, prompt, negative_prompt, **options)
    return run(job, group)


# ------------------------------------------------------------------------------------------------
# the command line's record (sdup.pipelines.upscaler)


def cli_settings(opts) -> dict:
    """The x4 options of the command line, ``DEFAULTS`` where not given (a whole noise level as an int)."""
    if opts.schedule:
        raise ValueError("--schedule is an option of the x2 latent upscaler, not of x4")
    level = DEFAULTS.noise_level if opts.noise_level is None else opts.noise_level
    return dict(steps=DEFAULTS.steps if opts.steps is None else opts.steps, sampler=opts.sampler or DEFAULTS.sampler,
                guidance=DEFAULTS.guidance if opts.guidance is None else opts.guidance,
                noise_level=int(level) if float(level).is_integer() else level)


def cli_job(model, image: Tensor | None = None, latents=None, **options) -> Job:
    """The job of one input image (1, 3, h, w) for the command line."""
    return prepare_x4(model, image, **options)


def min_side(model) -> int:
    """The UNet's multiple: the x4 latent has the input's size, and a smaller input would be mostly padding with a
    sub-pixel bottleneck."""
    return unet_multiple(model)


def latent_size(model, size: tuple[int, int], latent=None, scale: float = 4, settings=None) -> tuple[int, int]:
    """The input's size padded to the UNet's multiple (the x4 latent is the low-res image's size)."""
    m = unet_multiple(model)
    return -(-size[0] // m) * m, -(-size[1] // m) * m


UPSCALER = Upscaler(
    name="x4", family="x4", title="the x4 upscaler", scale=4, defaults=DEFAULTS, settings=cli_settings,
    check_options=check_options, job=cli_job, min_side=min_side, latent_size=latent_size, tile_multiple=unet_multiple,
    unet_bytes=ldm_unet_bytes, describe=lambda s: f"noise level {s['noise_level']:g}",
    expected_files="x4-upscaler-ema.safetensors or x4-upscaler-ema.ckpt (stabilityai/stable-diffusion-x4-upscaler), "
                   "or that repo's diffusers folder",
    official_config="x4-upscaling.yaml")
