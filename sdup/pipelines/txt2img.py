"""Stable Diffusion text-to-image (SD 1.x and 2.x, eps and v models; SPEC §2.5).

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
   on eps or v as the model predicts; then the sampler (``common.run_sampler``: DDIM / PLMS / DDPM on the
   LDM timesteps, Euler / Euler a / LMS / DPM++ 2M on diffusers' sigma grids).
4. image = clamp((vae.decode(x_0 / scale_factor) + 1) / 2, 0, 1); the VAE runs in fp32, one sample at a time.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .. import __version__
from ..diffusion.denoisers import CFG
from .common import (Result, check_finite, check_int, decode_scaled, parse_sampler, prompt_context, record_prompts,
                     resolve_eta, resolve_generators, run_sampler)

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


@torch.inference_mode()
def decode_latents(model, latents: Tensor, vae_dtype: torch.dtype = torch.float32) -> Tensor:
    """Scaled latents -> images in [0, 1] (``common.decode_scaled``: VAE in fp32 by default, one sample at a time), on
    the CPU."""
    return ((decode_scaled(model.vae, latents, model.scale_factor, vae_dtype=vae_dtype) + 1) / 2).clamp(0, 1)


@torch.inference_mode()
def txt2img(model, prompt: str | Sequence[str] | Tensor | None = None, negative_prompt: str | Sequence[str] | Tensor = "",
            *, prompt_embeds: Tensor | None = None, negative_embeds: Tensor | None = None,
            height: int = 512, width: int = 512, steps: int = 50, sampler: str = "ddim", guidance: float = 7.5,
            eta: float | None = None, seed: int | Sequence[int] | None = 42,
            generator: torch.Generator | Sequence[torch.Generator] | None = None, batch_size: int | None = None,
            x_T: Tensor | None = None, vae_dtype: torch.dtype = torch.float32,
            callback: Callable[[dict], None] | None = None,
            progress: bool = True) -> Result:
    """Generate images from text with an SD 1.x / 2.x ``LoadedModel``.

    prompt / negative_prompt: a string (shared by the batch), a list of strings (one per sample), or token ids
        ((L,) / (B, L) int tensor or lists, start/end tokens included; for encoders without a BPE tokenizer).
        The negative prompt is the unconditional input of classifier-free guidance ("" = the reference).
    prompt_embeds / negative_embeds: precomputed text-encoder contexts (77, D) or (B, 77, D) instead of text.
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
    _check_model(model)
    spec = parse_sampler(sampler)
    eta = resolve_eta(spec, eta)
    steps = check_int("steps", steps)
    check_finite("guidance", guidance)
    if prompt is None and prompt_embeds is None:
        raise ValueError("give a prompt (text or token ids) or prompt_embeds")
    if prompt is not None and prompt_embeds is not None:
        raise ValueError("give either prompt or prompt_embeds, not both")
    batch = check_int("batch_size", batch_size) if batch_size is not None else _batch_of(prompt, prompt_embeds)
    channels, h, w = latent_geometry(model, height, width)
    shape = (batch, channels, h, w)

    seeds, generators = resolve_generators(seed, generator, batch)
    device = next(model.unet.parameters()).device
    if x_T is None:
        from ..diffusion.samplers import randn
        x_T = randn(shape, generators)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
    x_T = x_T.float().to(device)

    cond = prompt_context(model, prompt, prompt_embeds, batch, "prompt")
    uncond = None
    if guidance != 1:
        uncond = prompt_context(model, negative_prompt, negative_embeds, batch, "negative_prompt")
    extra = dict(cond=dict(context=cond), uncond=None if uncond is None else dict(context=uncond))
    latents, grid = run_sampler(spec, CFG(_unet_net(model.unet), float(guidance)), model.schedule, model.prediction,
                                x_T, steps, eta=eta, extra_args=extra, generators=generators, callback=callback,
                                progress=progress)
    images = decode_latents(model, latents, vae_dtype)

    params = {
        "pipeline": "txt2img", "sdup_version": __version__, "model": str(model.source), "family": model.family,
        "prediction": model.prediction, "sampler": spec.name, "steps": steps, "guidance": float(guidance),
        "eta": eta, "height": height, "width": width, "batch_size": batch, "scale_factor": model.scale_factor,
        "dtype": str(next(model.unet.parameters()).dtype).replace("torch.", ""),
        "vae_dtype": str(vae_dtype).replace("torch.", ""),
    }
    record_prompts(params, batch, guidance, seeds, prompt=(prompt, prompt_embeds),
                   negative_prompt=(negative_prompt, negative_embeds))
    params.update(grid)
    return Result(images=images, latents=latents.float().cpu(), parameters=params)
