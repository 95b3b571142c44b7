"""Stable Diffusion text-to-image (SD 1.x and 2.x, eps and v models).

    model = sdup.load("sd-v1-4.ckpt")
    out = txt2img(model, "a photograph of an astronaut riding a horse", steps=50, sampler="ddim", seed=42)
    out.images      # (B, 3, H, W) in [0, 1]
    out.latents     # (B, 4, H/8, W/8), the UNet's latent space (= scale_factor * VAE latent): x2 upscaler input
    out.parameters  # everything needed to reproduce the run (also written into the PNGs by scripts/txt2img.py)

What it computes (CompVis ``scripts/txt2img.py`` / diffusers ``StableDiffusionPipeline``):

1. c = text_encoder(prompt).context; with guidance != 1, u = text_encoder(negative_prompt or "").context.
2. x_T ~ N(0, I) of shape (B, 4, H/8, W/8), sample i drawn from its own generator seeded ``seed + i``; the same
   generator then supplies that sample's per-step noise (DDIM eta > 0, DDPM, Euler a).
3. Network output with classifier-free guidance, ONE UNet call on the batch [u, c]: out_u + g (out_c - out_u),
   on eps or v as the model predicts; then the sampler (``diffusion.grids.ldm_grid``: DDIM / PLMS / DDPM on the LDM
   timesteps, Euler / Euler a / LMS / DPM++ 2M on diffusers' sigma grids).
4. image = clamp((vae.decode(x_0 / scale_factor) + 1) / 2, 0, 1); the VAE runs in fp32, one sample at a time.

Step by step: ``job = prepare_txt2img(...)``, ``latents = sample(job)``, ``finish(job, latents)``.

Arguments of ``prepare_txt2img`` (and of the wrapper, which takes the same):
    prompt / negative_prompt: a string (shared by the batch), a list of strings (one per sample), or token ids
        ((L,) / (B, L) int tensor or lists, start/end tokens included; for encoders without a BPE tokenizer).
        The negative prompt is the unconditional input of classifier-free guidance ("" = the reference).
    prompt_embeds / negative_embeds: precomputed text-encoder contexts (77, D) or (B, 77, D) instead of text
        (``conditioning.check_prompts``: the one rule of every pipeline).
    height, width: image size (multiples of 8; of 64 for SD's 3-times-downsampling UNet).
    steps: sampler steps (UNet evaluations, x2 with guidance; PLMS does one extra on its first step).
    sampler: ddim (the reference) | plms | ddpm | euler | euler_a | lms | dpmpp_2m (good images in ~20 steps).
    guidance: classifier-free guidance scale; 1 disables it (one UNet call per step, no negative prompt).
    eta: DDIM stochasticity (default 0) / Euler-ancestral noise scale (default 1); not accepted by the others.
    seed: base seed (sample i uses seed + i) or one seed per sample; None draws a random one (recorded).
    generator: one torch.Generator per sample instead of seeds (a single one is shared by the batch).
    batch_size: images to generate (default: the number of prompts, else 1).
    x_T: start noise (B, C, H/8, W/8) with unit variance instead of drawing it (the generators still drive
        the per-step noise).
    callback: called after every step with dict(i, t, sigma, x, x0_pred) (see ``sdup.diffusion.samplers``).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..diffusion.denoisers import CFG
from ..diffusion.grids import ldm_grid
from ..diffusion.samplers import get_sampler
from .checks import check_guidance, check_int, check_steps
from .conditioning import check_prompts, record_prompts, text_contexts
from .decoding import decode_latents
from .result import Result, dtype_name
from .seeds import resolve_generators
from .job import Job, base_parameters, finish, guided, sample, start_noise

Tensor = torch.Tensor
TEXT_TO_IMAGE_FAMILIES = ("sd1", "sd2")


def latent_geometry(model, height: int, width: int) -> tuple[int, int, int]:
    """(channels, h, w) of the latent for an H x W image; ValueError when the size does not fit the model."""
    height, width = check_int("height", height), check_int("width", width)
    vcfg = getattr(model.vae, "cfg", None)
    f = 2 ** (len(vcfg.ch_mult) - 1) if vcfg is not None else 8
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f} (the VAE's downsampling), got {height}x{width}")
    ucfg = getattr(model.unet, "cfg", None)
    m = 2 ** (len(ucfg.channel_mult) - 1) if ucfg is not None else 1
    if (height // f) % m or (width // f) % m:
        n = int(math.log2(m))
        raise ValueError(f"height and width must be multiples of {f * m} for this model (its UNet halves the "
                         f"{height // f}x{width // f} latent {n} time{'s' if n > 1 else ''}), got {height}x{width}")
    channels = vcfg.embed_dim if vcfg is not None else 4
    return channels, height // f, width // f


def _check_model(model) -> None:
    if model.family not in TEXT_TO_IMAGE_FAMILIES or model.unet is None or model.vae is None:
        raise ValueError(f"txt2img needs a Stable Diffusion 1.x / 2.x checkpoint (UNet + VAE + text encoder), "
                         f"{model.source} is a {model.family} model")
    if model.prediction not in ("eps", "v"):
        raise ValueError(f"unsupported prediction type {model.prediction!r} (eps or v)")


def _batch_of(prompt, prompt_embeds) -> int:
    if prompt_embeds is not None:
        return prompt_embeds.shape[0] if prompt_embeds.ndim == 3 else 1
    if isinstance(prompt, Tensor):
        return prompt.shape[0] if prompt.ndim == 2 else 1
    if isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def _unet_net(unet) -> Callable:
    """The raw network for the samplers: state kept in fp32, the UNet run in its own dtype."""
    p = next(unet.parameters())

    def net(x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        return unet(x.to(p.dtype), t.to(p.device), context.to(p.device, p.dtype)).float()
    return net


def prepare_txt2img(model, prompt: str | Sequence[str] | Tensor | None = None,
                    negative_prompt: str | Sequence[str] | Tensor = "",
            *, prompt_embeds: Tensor | None = None, negative_embeds: Tensor | None = None,
            height: int = 512, width: int = 512, steps: int = 50, sampler: str = "ddim", guidance: float = 7.5,
            eta: float | None = None, seed: int | Sequence[int] | None = 42,
            generator: torch.Generator | Sequence[torch.Generator] | None = None, batch_size: int | None = None,
            x_T: Tensor | None = None, vae_dtype: torch.dtype = torch.float32,
            callback: Callable[[dict], None] | None = None,
            progress: bool = True) -> Job:
    """The text-to-image ``Job`` for an SD 1.x / 2.x ``LoadedModel``: the arguments are in the module docstring;
    ``txt2img`` = ``finish(job, sample(job))``."""
    _check_model(model)
    spec = get_sampler(sampler)
    eta = spec.resolve_eta(eta)
    steps = check_steps(steps)
    check_guidance(guidance)
    prompts = check_prompts(prompt, negative_prompt, prompt_embeds, negative_embeds, required=True)
    batch = check_int("batch_size", batch_size) if batch_size is not None else _batch_of(prompt, prompt_embeds)
    channels, h, w = latent_geometry(model, height, width)
    seeds, generators = resolve_generators(seed, generator, batch)
    device = next(model.unet.parameters()).device
    x_T = start_noise(x_T, (batch, channels, h, w), generators, device)
    cond, uncond = text_contexts(model, prompts, batch, guided(guidance), device)
    den, grid, init_scale, record = ldm_grid(spec, CFG(_unet_net(model.unet), float(guidance)), model.schedule,
                                             model.prediction, steps, device)
    params = base_parameters("txt2img", model, steps, guidance, batch)
    params.update(prediction=model.prediction, eta=eta, height=height, width=width, scale_factor=model.scale_factor,
                  vae_dtype=dtype_name(vae_dtype))
    record_prompts(params, prompts, batch, guidance, seeds)
    params.update(record)
    return Job(sampler=spec, denoiser=den, x_T=x_T, grid=grid, extra_args=dict(cond=cond, uncond=uncond),
               init_scale=init_scale, options=spec.options(eta), generators=generators, callback=callback,
               progress=progress, decode=lambda z: decode_latents(model, z, clamp=False, vae_dtype=vae_dtype),
               parameters=params)


@torch.inference_mode()
def txt2img(model, prompt: str | Sequence[str] | Tensor | None = None,
            negative_prompt: str | Sequence[str] | Tensor = "", **options) -> Result:
    """Generate images from text: ``finish(job, sample(job))`` of ``prepare_txt2img`` (same arguments) under
    ``torch.inference_mode()``.  Returns ``Result(images (B, 3, H, W) in [0, 1], latents, parameters)``."""
    job = prepare_txt2img(model, prompt, negative_prompt, **options)
    return finish(job, sample(job))
