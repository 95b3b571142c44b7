"""stable-diffusion-x4-upscaler: text-guided 4x super-resolution (SPEC §3; v-prediction, pixel-space low-res concat).

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
input gives 262144 positions), so large inputs need tiled decoding (not part of this module yet).
"""
from __future__ import annotations

import operator
from functools import lru_cache
from typing import Callable, Sequence

import torch

from .. import __version__
from ..diffusion.denoisers import CFG
from ..diffusion.samplers import randn
from ..diffusion.schedules import ldm_buffers, ldm_linear_betas, q_sample
from .colorfix import COLOR_FIX_MODES, color_fix
from .common import (Result, check_finite, check_int, decode_scaled, pad_to_multiple, parse_sampler,
                     prompt_context, record_prompts, resolve_eta, resolve_generators, run_sampler)

Tensor = torch.Tensor
DEFAULTS = dict(noise_level=20, steps=75, guidance=9.0, eta=0.0, sampler="ddim")  # diffusers'
REFERENCE_DEFAULTS = {
    "diffusers": dict(steps=75, guidance=9.0, noise_level=20, eta=0.0),
    "gradio": dict(steps=75, guidance=10.0, noise_level=20, eta=0.0),
    "streamlit": dict(steps=50, guidance=9.0, noise_level=20, eta=0.0),
}


# ------------------------------------------------------------------------------------------------
# building blocks (public: the tests and the tiled variant use them)


@lru_cache(maxsize=8)
def _low_res_buffers(start: float, end: float, T: int) -> dict:
    return ldm_buffers(ldm_linear_betas(start, end, T))


def low_res_buffers(schedule: dict) -> dict[str, Tensor]:
    """The 8(+4) ``low_scale_model`` buffers of the noise augmentation (float32, LDM "linear" betas)."""
    return _low_res_buffers(float(schedule.get("noise_linear_start", 0.0001)),
                            float(schedule.get("noise_linear_end", 0.02)), int(schedule.get("noise_timesteps", 1000)))


def max_noise_level(model) -> int:
    return int(model.schedule.get("max_noise_level", 350))


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


@torch.inference_mode()
def decode(model, latents: Tensor, vae_tile: int | None = None, vae_overlap: int = 8, progress: bool = False,
           vae_dtype: torch.dtype = torch.float32) -> Tensor:
    """Scaled latents (B, 4, h, w) -> images (B, 3, 4h, 4w) in [-1, 1] (not clamped), float32 on the CPU: the model's
    VAE in fp32 by default (``common.decode_scaled``; the x4 VAE overflows in half precision: a non-finite fp16
    decode is redone in fp32)."""
    return decode_scaled(model.vae, latents, model.scale_factor, vae_tile=vae_tile, vae_overlap=vae_overlap,
                         progress=progress, vae_dtype=vae_dtype)


# ------------------------------------------------------------------------------------------------
# input checking


def _images(image, image_range) -> Tensor:
    """Tensor (3, h, w) / (B, 3, h, w) / list of them, or PIL image(s) -> (B, 3, h, w) float32 in [-1, 1]."""
    from .common import pil_to_tensor
    lo_hi = tuple(float(v) for v in image_range)
    if lo_hi not in ((0.0, 1.0), (-1.0, 1.0)):
        raise ValueError(f"image_range must be (0, 1) or (-1, 1), got {image_range!r}")
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError("no input image")
    tensors = []
    for it in items:
        if hasattr(it, "mode") and hasattr(it, "convert"):  # PIL
            if it.mode in ("RGBA", "LA", "PA"):
                raise ValueError("the input image has an alpha channel: the x4 upscaler works on RGB; split the alpha "
                                 "off (and upscale it separately) first")
            tensors.append(pil_to_tensor(it)[None] * 2 - 1)
            continue
        if not isinstance(it, Tensor) or not it.is_floating_point() or it.ndim not in (3, 4):
            raise ValueError("image must be a float tensor (3, h, w) / (B, 3, h, w), a PIL image, or a list of them; "
                             f"got {tuple(it.shape) if isinstance(it, Tensor) else type(it).__name__}")
        t = it[None] if it.ndim == 3 else it
        if t.shape[1] == 4:
            raise ValueError("the input image has 4 channels (RGBA): the x4 upscaler works on RGB; split the alpha "
                             "channel off (image[:, :3]) and upscale it separately")
        if t.shape[1] != 3:
            raise ValueError(f"the input image must have 3 (RGB) channels, got {t.shape[1]}")
        t = t.detach().float()
        if t.numel():
            mn, mx = float(t.min()), float(t.max())
            if mn < lo_hi[0] - 0.01 or mx > lo_hi[1] + 0.01:
                hint = " (pass image_range=(-1, 1) for [-1, 1] input)" if mn >= -1.01 and mx <= 1.01 else ""
                raise ValueError(f"image values span [{mn:.3g}, {mx:.3g}], outside image_range {lo_hi}{hint}")
        tensors.append(t * 2 - 1 if lo_hi == (0.0, 1.0) else t)
    if len({tuple(t.shape[1:]) for t in tensors}) != 1:
        sizes = sorted({tuple(t.shape[2:]) for t in tensors})
        raise ValueError(f"all input images must have the same size, got {sizes}")
    x = torch.cat([t.cpu() for t in tensors])
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"empty input image {tuple(x.shape[-2:])}")
    return x


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
            raise ValueError(f"noise_level must be in 0..{top} (the model's max_noise_level), got {v}")
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
# the pipeline


@torch.inference_mode()
def upscale_x4(model, image, prompt: str | Sequence[str] | Tensor | None = "",
               negative_prompt: str | Sequence[str] | Tensor = "",
               *, prompt_embeds: Tensor | None = None, negative_embeds: Tensor | None = None,
               noise_level: int | Sequence[int] | Tensor = 20, steps: int = 75, sampler: str = "ddim",
               guidance: float = 9.0, eta: float | None = None, seed: int | Sequence[int] | None = 42,
               generator: torch.Generator | Sequence[torch.Generator] | None = None,
               x_T: Tensor | None = None, aug_noise: Tensor | None = None, image_range=(0, 1),
               pad_mode: str | None = "replicate", color_fix_mode: str = "none", tile: int | None = None,
               tile_overlap: int = 32, vae_tile: int | None = None, vae_overlap: int = 8,
               vae_dtype: torch.dtype = torch.float32,
               callback: Callable[[dict], None] | None = None, progress: bool = True) -> Result:
    """Upscale low-res images 4x with a stable-diffusion-x4-upscaler ``LoadedModel`` (see the module docstring).

    image: (B, 3, h, w) / (3, h, w) float tensor in [0, 1] (``image_range=(-1, 1)`` for [-1, 1] input), a PIL
        image, or a list of those; RGB only (an alpha channel raises ValueError).
    prompt / negative_prompt: a string (shared), one string per image, or token ids ((L,) / (B, L) int tensor or
        lists, start/end tokens included -- needed for encoders without a BPE tokenizer). "" = no text.
    prompt_embeds / negative_embeds: precomputed text-encoder contexts (77, D) or (B, 77, D) instead of text.
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
        a tile covering the latent gives the untiled result.
    callback: called after every step with dict(i, t, sigma, x, x0_pred) (latents at the padded size).
    Returns ``Result(images (B, 3, 4h, 4w) in [0, 1], latents, parameters)``.
    """
    _check_model(model)
    spec = parse_sampler(sampler)
    eta = resolve_eta(spec, eta)
    steps = check_int("steps", steps)
    check_finite("guidance", guidance)
    if color_fix_mode not in COLOR_FIX_MODES:
        raise ValueError(f"unknown colour fix {color_fix_mode!r} (choose from {', '.join(COLOR_FIX_MODES)})")
    if prompt is not None and prompt_embeds is not None:
        if not (isinstance(prompt, str) and prompt == ""):
            raise ValueError("give either prompt or prompt_embeds, not both")
        prompt = None
    if prompt is None and prompt_embeds is None:
        prompt = ""

    low = _images(image, image_range)                  # (B, 3, h, w) in [-1, 1]
    batch, (h, w) = low.shape[0], tuple(low.shape[-2:])
    levels = _noise_levels(noise_level, batch, max_noise_level(model))
    padded, (ph, pw) = pad_to_multiple(low, unet_multiple(model), pad_mode, "low-res image")
    H, W = padded.shape[-2:]
    channels = model.vae.cfg.embed_dim if hasattr(model.vae, "cfg") else 4

    seeds, generators = resolve_generators(seed, generator, batch)

    # random numbers in diffusers' order: augmentation noise, then the start latent (per generator)
    if aug_noise is None:
        aug_noise = randn(padded.shape, generators)
    elif tuple(aug_noise.shape) != tuple(padded.shape):
        raise ValueError(f"aug_noise must have shape {tuple(padded.shape)} (the padded low-res size), got "
                         f"{tuple(aug_noise.shape)}")
    shape = (batch, channels, H, W)
    if x_T is None:
        x_T = randn(shape, generators)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have shape {shape} (latent = padded low-res size), got {tuple(x_T.shape)}")

    device = next(model.unet.parameters()).device
    x_aug = noise_augment(padded, levels, aug_noise.float().cpu(), model.schedule).to(device)
    cond = dict(context=prompt_context(model, prompt, prompt_embeds, batch, "prompt").to(device),
                concat=x_aug, y=levels.to(device))
    uncond = None
    if guidance != 1:
        neg = prompt_context(model, negative_prompt, negative_embeds, batch, "negative_prompt")
        uncond = dict(context=neg.to(device))
    net = x4_network(model.unet)
    if tile:
        from .tiling import TiledModel
        m = unet_multiple(model)
        t = max(m, tile - tile % m)  # tiles must be multiples of the UNet's factor
        net = TiledModel(net, tile=t, overlap=min(tile_overlap, t - m), progress=progress)
    latents, grid = run_sampler(spec, CFG(net, float(guidance)), model.schedule, model.prediction,
                                x_T.float().to(device), steps, eta=eta, extra_args=dict(cond=cond, uncond=uncond),
                                generators=generators, callback=callback, progress=progress)

    out = decode(model, latents, vae_tile, vae_overlap, progress, vae_dtype)[..., : 4 * h, : 4 * w]  # [-1, 1], cropped to 4h x 4w
    if color_fix_mode != "none":
        out = color_fix(out, low, color_fix_mode)
    images = ((out + 1) / 2).clamp(0, 1)

    params = {
        "pipeline": "x4", "sdup_version": __version__, "model": str(model.source), "family": model.family,
        "prediction": model.prediction, "sampler": spec.name, "steps": steps, "guidance": float(guidance), "eta": eta,
        "input_size": [h, w], "output_size": [4 * h, 4 * w], "batch_size": batch, "scale_factor": model.scale_factor,
        "dtype": str(next(model.unet.parameters()).dtype).replace("torch.", ""), "color_fix": color_fix_mode,
        "vae_dtype": "float32" if vae_tile else str(vae_dtype).replace("torch.", ""),  # tiled decodes: fp32
    }
    lv = levels.tolist()
    if len(set(lv)) == 1:
        params["noise_level"] = lv[0]
    else:
        params["noise_levels"] = lv
    if ph or pw:
        params["padding"] = {"mode": pad_mode, "bottom": ph, "right": pw}
    if tile or vae_tile:
        params["tiling"] = {"tile": net.tile[0] if tile else None, "overlap": net.overlap[0] if tile else None,
                            "vae_tile": vae_tile, "vae_overlap": vae_overlap if vae_tile else None}
    record_prompts(params, batch, guidance, seeds, prompt=(prompt, prompt_embeds),
                   negative_prompt=(negative_prompt, negative_embeds))
    params.update(grid)
    return Result(images=images, latents=latents.float().cpu(), parameters=params)
