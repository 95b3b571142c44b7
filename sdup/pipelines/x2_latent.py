"""sd-x2-latent-upscaler: text-guided 2x upscaling of Stable Diffusion latents.

    model = sdup.load("sd-x2-latent-upscaler/")          # diffusers folder (unet/, text_encoder/, vae/)
    sd = sdup.load("sd-v1-4.ckpt")
    low = txt2img(sd, "a castle on a hill", seed=1).latents            # (B, 4, 64, 64), already * 0.18215
    out = upscale_latents_x2(model, low, "a castle on a hill", steps=20, seed=1)
    out.images      # (B, 3, 1024, 1024) in [0, 1]  (None with decode=False)
    out.latents     # (B, 4, 128, 128) scaled latents (SD's latent space, 0.18215)
    out.parameters  # everything needed to reproduce the run

    out = upscale_latents_x2(model, image=img, prompt="...", vae=sd)   # from an image (B, 3, H, W) in [0, 1]

The latent contract
    The model only understands SD 1.x / 2.x latents: 4 channels from the f=8 SD VAE, multiplied by 0.18215
    (what ``txt2img(...).latents`` and ``scripts/txt2img.py --latents-out`` give).  Anything with another channel
    count raises a ValueError (a 3-channel tensor is an image: pass it as ``image=``).  SDXL latents also have 4
    channels but a different latent space (scale 0.13025, another VAE): they pass the shape check and give blurry
    results (huggingface/diffusers#5410) -- decode them with the SDXL VAE and pass the image instead.
    The UNet halves the 2h x 2w output latent ``levels - 1`` times, so h and w must be multiples of
    2**(levels - 2) (4 for the real model: images of multiples of 32 pixels).

What it computes (diffusers ``StableDiffusionLatentUpscalePipeline``; the original k-diffusion notebook where noted):

1. Text: CLIP ViT-L/14 ``hidden_states[-1]`` = the last layer BEFORE the final LayerNorm (TextOutput.hidden_pre_ln)
   as the cross-attention tokens, and the pooled (final-LN'd EOS) vector; negative prompt "" by default.
   diffusers passes no padding mask (the default here); ``mask_padding=True`` reproduces the original, which adds
   -10000 to the logits of the padding tokens after the first EOS.
2. Image path: L = VAE.encode(2 image - 1).sample() * 0.18215 (``sample_posterior=False``: the mean).
3. Low-res conditioning (original wrapper ``NoiseLevelAndTextConditionedUpscaler``): noise level s (default 0,
   diffusers hard-codes 0): ``noise_aug="gaussian"``: L <- L + s N(0, I); ``"fake"``: L <- L sqrt(s^2 + 1);
   unet_cond = nearest_up2(L) / sqrt(s^2 + 1); mapping_cond = [FourierFeatures(log1p(s)) (128), pooled (768)].
   For s = 0 the features are [1]*64 ++ [0]*64 whatever the weights; s > 0 needs ``low_res_noise_embed``, which only
   the original k-diffusion checkpoint ships (a diffusers folder raises a ValueError).
4. Karras preconditioning (sigma_data = 1): D(x, sigma) = x / (sigma^2 + 1) + sigma / sqrt(sigma^2 + 1) *
   F(x / sqrt(sigma^2 + 1), ln(sigma) / 4, unet_cond, mapping_cond, text)[:, :4]  (channel 5 = log-variance, dropped);
   classifier-free guidance on D with ONE batched call on [uncond, cond] (only the text / pooled differ).
5. Sampler over a sigma grid, starting from x_T * sigmas[0]:
   ``schedule="diffusers"`` (default): EulerDiscreteScheduler's grid (timesteps linspace(999, 0, steps), sigmas
   interpolated linearly over the float32 training sigmas of the scaled_linear 0.00085..0.012 schedule, final 0);
   ``"original"``: the notebook's exp(linspace(ln 14.614642, ln 0.0291675, steps + 1)) (no final 0: the result is
   the state at sigma_min); ``"karras"``: Karras rho=7 over the same range plus 0; or an explicit ``sigmas`` tensor.
   Samplers: euler (diffusers), euler_a, lms, dpmpp_2m (the k-diffusion functions; all run on the same D).
6. images = clamp((VAE.decode(latents / 0.18215) + 1) / 2, 0, 1), the VAE in fp32, one sample at a time.

Random numbers: one generator per sample (``seed + i``), each drawing, in this order, the VAE posterior noise
(image path), x_T (B, 4, 2h, 2w), the gaussian augmentation noise (s > 0) and the per-step noise (euler_a) --
the order of diffusers, so ``seed=s`` equals diffusers with ``generator=[Generator().manual_seed(s + i) ...]``.

Defaults: diffusers (sdup's defaults) steps 75, guidance 9.0, Euler, noise level 0, no padding mask.  The original
Colab notebook: steps 50, guidance 1 (no CFG), sampler dpm_adaptive (k-diffusion; not in sdup, euler_a / euler
offered there too), the exponential sigma grid above, noise level 0, padding mask on (see ``Defaults``).
Guidance: sdup's one rule (guidance runs for every scale != 1, ``job.guided``); ``guidance_rule="diffusers"`` skips it
for every scale <= 1 as diffusers does.
Step by step: ``job = prepare_x2(...)``, ``latents = sample(job)``, ``finish(job, latents)`` (``sdup.pipelines.job``).

Arguments of ``prepare_x2`` (and of the wrapper, which takes the same):
    latents: (B, 4, h, w) scaled SD 1.x / 2.x latents (the latent contract, module docstring); or
    image: (B, 3, H, W) in [0, 1], encoded with ``vae`` (or the model's own vae/). Exactly one of the two.
    vae: an SD VAE (LoadedModel or sdup AutoencoderKL) for encoding / decoding; default the model's vae/.
    prompt / negative_prompt: text or token ids (as txt2img); the prompt should describe the image ("" works).
    prompt_embeds + pooled_prompt_embeds (+ negative_embeds + negative_pooled_embeds): precomputed text features
        (hidden_states[-1] (B, 77, D) and pooler_output (B, D)) instead of text (``conditioning.check_prompts``:
        the one rule of every pipeline). ``prompt_mask`` /
        ``negative_mask`` (B, 77) go with them when ``mask_padding``.
    steps, sampler (euler | euler_a | lms | dpmpp_2m), schedule (diffusers | original | karras) or sigmas (an
        explicit grid, visiting order, final 0 or not): see the module docstring.
    guidance: CFG scale on D; 1 runs the conditional half only (``job.guided``; ``guidance_rule="diffusers"``: any
        scale <= 1 does, as diffusers); 0 also replaces a text prompt by "" (diffusers).
    eta: Euler-ancestral noise scale (default 1).
    seed / generator: one generator per sample (seed + i); x_T: (B, 4, 2h, 2w) unit-variance start noise.
    noise_level: the original's low-res noise augmentation s (needs the k-diffusion checkpoint for s > 0);
        noise_aug: "gaussian" (L + s N) or "fake" (L sqrt(s^2 + 1)).
    mask_padding: mask the text padding tokens as the original model did (diffusers does not).
    sample_posterior: image path: VAE posterior sample (diffusers / original) or its mean.
    pad_mode: image path: an image whose sides are not multiples of 8 * ``latent_multiple`` (32 for the real
        model) is padded bottom / right ("replicate" | "reflect") and the output cropped back to exactly 2H x 2W;
        None raises instead. Latents are never padded (the latent contract).
    tile, tile_overlap: run the K-UNet on overlapping tiles of the 2x latent (``tiling.TiledModel``, Gaussian
        blending every step; one tile covering the latent = the untiled run); vae_tile, vae_overlap: decode with
        ``tiling.tiled_decode`` (exact, bounded memory); plan: a ``tiling.TilePlan`` for the 2x latent instead of
        these four (the command line's, built once per input).
    color_fix_mode: "none" | "adain" | "wavelet": match the output's colours to the input image (latents path: to
        the VAE decode of the low-res latents).
    callback(dict(i, t, sigma, x, x0_pred)) after every step; decode=False skips the VAE (images None).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import torch

from dataclasses import dataclass, replace

from ..checkpoints.loader import FAMILY_DEFAULTS, LoadedModel, inspect
from ..diffusion.denoisers import CFG, KarrasDenoiser
from ..diffusion.samplers import SIGMA_SAMPLERS, get_sampler, randn
from ..diffusion.schedules import diffusers_alphas_cumprod, discrete_sigmas, exponential_sigmas, karras_sigmas
from ..models.latent_upscaler import KUNet, KUNetConfig
from ..models.text import KNOWN_TEXT_CONFIGS, TextEncoder
from ..models.vae import AutoencoderKL, VAEConfig
from ..tiling import TilePlan
from ..tiling.memory import kunet_bytes
from .checks import check_guidance, check_steps, pad_to_multiple
from .conditioning import Prompts, check_prompts, pooled_text, record_prompts
from .decoding import decode_latents, encode_image, recorded_dtype
from .job import Job, base_parameters, check_color_fix, guided, run, start_noise, tile_plan
from .latents_file import read_latents
from .result import Result
from .seeds import resolve_generators
from .upscaler import Upscaler

Tensor = torch.Tensor
SIGMA_MIN, SIGMA_MAX = 0.0291675, 14.614642   # the original notebook's range (= SD's training sigma range)
SCHEDULES = ("diffusers", "original", "karras")
NOISE_AUG = ("gaussian", "fake")
SAMPLERS = SIGMA_SAMPLERS   # a Karras denoiser D(x, sigma): the sigma samplers of the registry


@dataclass(frozen=True)
class Defaults:
    """diffusers' values, sdup's defaults.  The original Colab notebook: steps 50, guidance 1 (no CFG), sampler
    dpm_adaptive (not in sdup; euler / euler_a are offered there too), schedule "original", mask_padding True."""
    steps: int = 75
    guidance: float = 9.0
    sampler: str = "euler"
    schedule: str = "diffusers"
    noise_level: float = 0.0
    mask_padding: bool = False


DEFAULTS = Defaults()


# ------------------------------------------------------------------------------------------------
# building blocks


def check_x2_model(model) -> None:
    unet, family = getattr(model, "unet", None), getattr(model, "family", None)
    if family != "x2" or unet is None or not hasattr(unet, "low_res_conditioning"):
        hint = " (the x4 upscaler has its own pipeline: upscale_x4)" if family == "x4" else ""
        raise ValueError(f"upscale_latents_x2 needs an sd-x2-latent-upscaler model (K-UNet), got a "
                         f"{family or type(model).__name__} model{hint}")


def latent_multiple(unet) -> int:
    """Low-res latent sizes must be multiples of this: the 2x output is halved ``levels - 1`` times."""
    return max(1, 2 ** (len(unet.cfg.channels) - 1) // 2)


def check_latents(unet, latents) -> Tensor:
    """The latent contract (see the module docstring): (B, 4, h, w) float SD latents, h and w multiples of
    ``latent_multiple``. Returns the latents as a float32 tensor."""
    c = unet.cfg.unet_cond_channels
    if not isinstance(latents, Tensor) or not latents.is_floating_point():
        raise ValueError(f"latents must be a float tensor (B, {c}, h, w), got "
                         f"{type(latents).__name__ if not isinstance(latents, Tensor) else latents.dtype}")
    x = latents[None] if latents.ndim == 3 else latents
    if x.ndim != 4:
        raise ValueError(f"latents must be (B, {c}, h, w), got shape {tuple(latents.shape)}")
    if x.shape[1] != c:
        hint = (" -- a 3-channel tensor is an image: pass it as image= (with an SD VAE) instead of latents"
                if x.shape[1] == 3 else "")
        raise ValueError(f"the x2 latent upscaler works on SD 1.x / 2.x latents: {c} channels from the f=8 SD VAE, "
                         f"scaled by 0.18215 (e.g. txt2img(...).latents); got {x.shape[1]} channels "
                         f"(shape {tuple(latents.shape)}){hint}")
    m = latent_multiple(unet)
    if x.shape[-2] % m or x.shape[-1] % m:
        raise ValueError(f"low-res latent size must be a multiple of {m} (the K-UNet halves the 2x latent "
                         f"{len(unet.cfg.channels) - 1} times), got {x.shape[-2]}x{x.shape[-1]}")
    if min(x.shape[-2:]) < 2 * m:  # the K-UNet's bottom level would be 1 px wide: its reflect padding needs 2
        raise ValueError(f"low-res latents must be at least {2 * m}x{2 * m} (images of {16 * m} px), got "
                         f"{x.shape[-2]}x{x.shape[-1]}")
    if not torch.isfinite(x).all():
        raise ValueError("latents contain NaN or inf")
    return x.float()


def _vae_module(vae):
    """A LoadedModel (its .vae) or an sdup AutoencoderKL -> the module (None stays None)."""
    if vae is None:
        return None
    module = getattr(vae, "vae", vae) if not hasattr(vae, "decoder") else vae
    if module is None or not hasattr(module, "encode") or not hasattr(module, "decode"):
        raise ValueError("vae must be an sdup AutoencoderKL or a LoadedModel with a VAE (e.g. sdup.load of an SD "
                         "1.x / 2.x checkpoint or VAE)")
    cfg = getattr(module, "cfg", None)
    if cfg is not None and getattr(cfg, "embed_dim", 4) != 4:
        raise ValueError(f"the x2 upscaler needs the 4-channel SD VAE, this VAE has {cfg.embed_dim} latent channels")
    return module


def x2_network(unet) -> Callable:
    """The network body F for ``KarrasDenoiser``: ``net(x_in, c_noise, unet_cond, mapping_cond, context,
    context_mask=None)`` -> the first ``input_channels`` output channels (log-variance dropped). The sampler state
    stays fp32; the UNet runs in its own dtype / device."""
    p = next(unet.parameters())
    n = unet.cfg.input_channels

    def net(x: Tensor, c_noise: Tensor, unet_cond: Tensor, mapping_cond: Tensor, context: Tensor,
            context_mask: Tensor | None = None) -> Tensor:
        h = torch.cat([x, unet_cond.to(x.dtype)], dim=1).to(p.device, p.dtype)
        out = unet(h, c_noise.to(p.device, torch.float32), mapping_cond.to(p.device, p.dtype),
                   context.to(p.device, p.dtype), None if context_mask is None else context_mask.to(p.device))
        return out[:, :n].float()
    return net


def x2_sigmas(steps: int, schedule: str = "diffusers", model=None) -> Tensor:
    """The sigma grid (visiting order, float32): see the module docstring, step 5."""
    steps = check_steps(steps)
    if schedule == "diffusers":
        s = getattr(model, "schedule", None) or {}
        ac = diffusers_alphas_cumprod(float(s.get("linear_start", 0.00085)), float(s.get("linear_end", 0.012)),
                                      int(s.get("timesteps", 1000)), "scaled_linear")
        return discrete_sigmas(ac, steps, "linspace", 0)[0]
    if schedule in ("original", "kdiffusion", "exponential"):
        return exponential_sigmas(steps + 1, SIGMA_MIN, SIGMA_MAX)[:-1]
    if schedule == "karras":
        return karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX)
    raise ValueError(f"unknown sigma schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")


# ------------------------------------------------------------------------------------------------
# the pipeline


def prepare_x2(model, latents: Tensor | None = None, prompt: str | Sequence[str] | Tensor | None = "",
               negative_prompt: str | Sequence[str] | Tensor = "", *, image: Tensor | None = None, vae=None,
               prompt_embeds: Tensor | None = None, pooled_prompt_embeds: Tensor | None = None,
               negative_embeds: Tensor | None = None, negative_pooled_embeds: Tensor | None = None,
               prompt_mask: Tensor | None = None, negative_mask: Tensor | None = None,
               steps: int = DEFAULTS.steps, sampler: str = DEFAULTS.sampler, schedule: str = DEFAULTS.schedule,
               sigmas: Tensor | None = None, guidance: float = DEFAULTS.guidance, eta: float | None = None,
               seed: int | Sequence[int] | None = 42,
               generator: torch.Generator | Sequence[torch.Generator] | None = None,
               x_T: Tensor | None = None, noise_level: float = 0.0, noise_aug: str = "gaussian",
               mask_padding: bool = False, sample_posterior: bool = True, pad_mode: str | None = "replicate",
               tile: int | None = None, tile_overlap: int = 16, vae_tile: int | None = None,
               vae_overlap: int = 8, plan: TilePlan | None = None, vae_dtype: torch.dtype = torch.float32,
               color_fix_mode: str = "none",
               callback: Callable[[dict], None] | None = None, progress: bool = True,
               decode: bool = True, guidance_rule: str = "sdup") -> Job:
    """The x2 ``Job`` for SD latents (or an image through the SD VAE) and an sd-x2-latent-upscaler ``LoadedModel``:
    the arguments are in the module docstring; ``upscale_latents_x2`` = ``finish(job, sample(job))``."""
    check_options(model, sampler=sampler, steps=steps, guidance=guidance, noise_level=noise_level, eta=eta,
                  noise_aug=noise_aug, color_fix_mode=color_fix_mode, schedule=schedule if sigmas is None else "diffusers")
    if (latents is None) == (image is None):
        raise ValueError("give exactly one of latents (B, 4, h, w) and image (B, 3, H, W)")
    unet, spec = model.unet, get_sampler(sampler)
    eta, use_cfg = spec.resolve_eta(eta), guided(guidance, guidance_rule)
    prompts = _x2_prompts(check_prompts(prompt, negative_prompt, prompt_embeds, negative_embeds), guidance)
    vae_module = _x2_vae(model, vae, decode or image is not None)
    image, in_hw, padding = _x2_image(image, vae_module, unet, pad_mode)
    batch = image.shape[0] if image is not None else 1 if latents.ndim == 3 else latents.shape[0]
    scale_factor = float(getattr(model, "scale_factor", 0.18215))
    seeds, generators = resolve_generators(seed, generator, batch)
    p = next(unet.parameters())
    text = [pooled_text(model, prompts.prompt, prompt_embeds, pooled_prompt_embeds, prompt_mask, batch, "prompt",
                        mask_padding)]
    if use_cfg:  # text before any random draw: errors come first
        text.append(pooled_text(model, prompts.negative_prompt, negative_embeds, negative_pooled_embeds, negative_mask,
                                batch, "negative_prompt", mask_padding))
    if image is not None:
        latents = encode_image(vae_module, image, scale_factor, generators, sample_posterior)
    low = check_latents(unet, latents).to(p.device)
    shape = (batch, unet.cfg.input_channels, 2 * low.shape[-2], 2 * low.shape[-1])
    x_T = start_noise(x_T, shape, generators, p.device)
    low, extra = _x2_conditioning(unet, low, text, noise_level, noise_aug, generators)
    sigmas, schedule = _x2_grid(sigmas, steps, schedule, model)
    plan = tile_plan(plan, shape[-2:], tile, tile_overlap, vae_tile, vae_overlap, 2 * latent_multiple(unet))
    net = plan.wrap(x2_network(unet), progress)
    den = CFG(KarrasDenoiser(net, sigma_data=unet.cfg.sigma_data, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX),
              float(guidance) if use_cfg else 1.0)
    params = base_parameters("x2_latent", model, len(sigmas) - 1, guidance, batch)
    params.update(schedule=schedule, eta=eta, noise_level=float(noise_level),
                  noise_aug=noise_aug if noise_level > 0 else None, mask_padding=bool(mask_padding),
                  input="image" if image is not None else "latents",
                  sample_posterior=bool(sample_posterior) if image is not None else None,
                  low_res_size=list(low.shape[-2:]), latent_size=list(shape[-2:]), scale_factor=scale_factor)
    record_prompts(params, prompts, batch, guidance if use_cfg else 1.0, seeds)
    decoding = _x2_decoding(vae_module, scale_factor, image, in_hw, low, shape[-2:], color_fix_mode, plan.vae_tile,
                            plan.vae_overlap, vae_dtype, progress, params) if decode else {}
    _x2_layout_parameters(params, padding, pad_mode)
    return Job(sampler=spec, denoiser=den, x_T=x_T, grid=sigmas.to(p.device), extra_args=extra,
               init_scale=float(sigmas[0]), options=spec.options(eta), generators=generators, callback=callback,
               progress=progress, plan=plan, parameters=params, **decoding)


def _x2_layout_parameters(params: dict, padding, pad_mode) -> None:
    if any(padding):
        params["padding"] = {"mode": pad_mode, "bottom": padding[0], "right": padding[1]}


def check_options(model, *, sampler: str = DEFAULTS.sampler, steps: int = DEFAULTS.steps,
                  guidance: float = DEFAULTS.guidance, noise_level: float = DEFAULTS.noise_level, eta: float | None = None,
                  noise_aug: str = "gaussian", color_fix_mode: str = "none", schedule: str = DEFAULTS.schedule) -> None:
    """The options that need no input checked (ValueError); ``prepare_x2`` and the CLI (before loading any weights:
    ``model`` None) use it."""
    if model is not None:
        check_x2_model(model)
    spec = get_sampler(sampler)
    if spec.discrete:
        raise ValueError(f"sampler {spec.name}: the x2 latent upscaler is a Karras-preconditioned denoiser, use a "
                         f"sigma sampler ({', '.join(SAMPLERS)})")
    if schedule not in SCHEDULES + ("kdiffusion", "exponential"):
        raise ValueError(f"unknown sigma schedule {schedule!r} (choose from {', '.join(SCHEDULES)})")
    spec.resolve_eta(eta)
    check_steps(steps)
    check_guidance(guidance)
    if not isinstance(noise_level, (int, float)) or isinstance(noise_level, bool) or not noise_level >= 0 \
            or not math.isfinite(noise_level):
        raise ValueError(f"noise_level must be a finite number >= 0, got {noise_level!r}")
    if noise_aug not in NOISE_AUG:
        raise ValueError(f"noise_aug must be one of {NOISE_AUG}, got {noise_aug!r}")
    if noise_level > 0 and model is not None and model.unet.noise_aug_features is None:
        raise ValueError("noise_level > 0 (the original's low-res noise augmentation) needs the low_res_noise_embed "
                         "weights, which only the original k-diffusion checkpoint (model_ema) contains; the diffusers "
                         "folder hard-codes noise level 0")
    check_color_fix(color_fix_mode)


def _x2_prompts(prompts: Prompts, guidance: float) -> Prompts:
    """diffusers: guidance_scale == 0 replaces a text prompt by ""."""
    return replace(prompts, prompt="") if guidance == 0 and prompts.prompt_embeds is None else prompts


def _x2_vae(model, vae, needed: bool):
    """The VAE module: ``vae`` (checked) or the model's own vae/; a ValueError when needed and there is none."""
    module = _vae_module(vae) if vae is not None else getattr(model, "vae", None)
    if needed and module is None:
        raise ValueError("no VAE: this x2 model has no vae/ folder; pass vae= an SD 1.x / 2.x VAE (e.g. "
                         "sdup.load('sd-v1-4.ckpt')) or use latents with decode=False")
    return module


def _x2_image(image, vae_module, unet, pad_mode):
    """(padded image (B, 3, H', W') in [0, 1], its size before padding, (pad_h, pad_w)); no image: (None, None, (0, 0))."""
    if image is None:
        return None, None, (0, 0)
    if not isinstance(image, Tensor) or not image.is_floating_point() or image.ndim not in (3, 4) \
            or image.shape[-3] != 3:
        raise ValueError(f"image must be a float tensor (B, 3, H, W) in [0, 1], got "
                         f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}"
                         + (" -- 4-channel tensors are latents: pass them as latents="
                            if isinstance(image, Tensor) and image.ndim in (3, 4) and image.shape[-3] == 4 else ""))
    image = image[None] if image.ndim == 3 else image
    f = vae_module.cfg.downscale if getattr(vae_module, "cfg", None) is not None else 8
    padded, padding = pad_to_multiple(image, f * latent_multiple(unet), pad_mode, "image")
    return padded, tuple(image.shape[-2:]), padding


def _x2_conditioning(unet, low: Tensor, text: list, noise_level: float, noise_aug: str, generators):
    """(the augmented low-res latent, extra_args) from the low-res latent and the [cond, uncond] text features."""
    batch, device = low.shape[0], low.device
    s = torch.full((batch,), float(noise_level), device=device)
    if noise_level > 0:
        low = low + noise_level * randn(low.shape, generators, device=device) if noise_aug == "gaussian" \
            else low * math.sqrt(noise_level ** 2 + 1)
    (ctx, pooled, mask), uncond = text[0], None
    unet_cond, mapping_cond = unet.low_res_conditioning(low, s, pooled.to(device))
    cond = dict(unet_cond=unet_cond.float(), mapping_cond=mapping_cond.float(), context=ctx)
    if mask is not None:
        cond["context_mask"] = mask
    if len(text) > 1:
        u_ctx, u_pooled, u_mask = text[1]
        uncond = dict(mapping_cond=unet.low_res_conditioning(low, s, u_pooled.to(device))[1].float(), context=u_ctx)
        if u_mask is not None:
            uncond["context_mask"] = u_mask
    return low, dict(cond=cond, uncond=uncond)


def _x2_grid(sigmas, steps: int, schedule: str, model) -> tuple[Tensor, str]:
    """(sigma grid, schedule name): ``x2_sigmas`` or an explicit grid (then "custom")."""
    if sigmas is None:
        return x2_sigmas(steps, schedule, model), schedule
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).reshape(-1)
    if len(sigmas) < 2 or not bool((sigmas[:-1] > 0).all()) or not bool((sigmas[1:] <= sigmas[:-1]).all()):
        raise ValueError("sigmas must be a descending grid of >= 2 values, all > 0 but the last")
    return sigmas, "custom"


def _x2_decoding(vae, scale_factor: float, image, in_hw, low: Tensor, latent_hw, color_fix_mode: str, vae_tile,
                 vae_overlap: int, vae_dtype, progress: bool, params: dict) -> dict:
    """The decode half of the job, as ``Job`` fields: VAE decode, colour fix against the input image (latents: the
    decoded low-res latents), crop of the image padding; its parameters go into ``params``."""
    options = dict(clamp=False, vae_tile=vae_tile, vae_overlap=vae_overlap, progress=progress, vae_dtype=vae_dtype)
    fields = dict(decode=lambda z: decode_latents(vae, z, scale_factor, **options), color_fix=color_fix_mode)
    if image is not None:
        fields.update(color_ref=2 * image.float() - 1, crop=(2 * in_hw[0], 2 * in_hw[1]))
    else:
        fields["color_ref"] = lambda: decode_latents(vae, low, scale_factor, clamp=False)
    f = vae.cfg.downscale if getattr(vae, "cfg", None) is not None else 8
    h, w = fields.get("crop") or (f * latent_hw[0], f * latent_hw[1])
    params.update(height=h, width=w, color_fix=color_fix_mode, vae_dtype=recorded_dtype(vae, vae_dtype, vae_tile))
    return fields


@torch.inference_mode()
def upscale_latents_x2(model, latents: Tensor | None = None, prompt: str | Sequence[str] | Tensor | None = "",
                       negative_prompt: str | Sequence[str] | Tensor = "", *, group=None, **options) -> Result:
    """Upscale SD latents (or ``image=``) 2x: ``finish(job, sample(job))`` of ``prepare_x2`` (same arguments) under
    ``torch.inference_mode()``.  ``Result.images`` is None with ``decode=False``."""
    job = prepare_x2(model, latents, prompt, negative_prompt, **options)
    return run(job, group)


# ------------------------------------------------------------------------------------------------
# the command line's record (sdup.pipelines.upscaler)

SD_VAE_FAMILIES = ("sd1", "sd2", "vae", "x2", "stablesr")   # checkpoints that hold the 4-channel SD VAE


def cli_settings(opts) -> dict:
    """The x2 options of the command line, ``DEFAULTS`` where not given."""
    D = DEFAULTS
    return dict(steps=D.steps if opts.steps is None else opts.steps, sampler=opts.sampler or D.sampler, schedule=opts.schedule or D.schedule,
                guidance=D.guidance if opts.guidance is None else opts.guidance,
                noise_level=D.noise_level if opts.noise_level is None else opts.noise_level)


def cli_job(model, image: Tensor | None = None, latents: Tensor | None = None, **options) -> Job:
    """The job of one input image (1, 3, H, W) (VAE-encoded) or of one sample (1, 4, h, w) of a latents file."""
    return prepare_x2(model, latents, image=image, vae=model.vae, **options)


def _vae_factor(vae) -> int:
    cfg = getattr(vae, "cfg", None)
    return cfg.downscale if cfg is not None else 8


def min_side(model) -> int:
    """Twice the VAE factor times the K-UNet's latent multiple (2 x 8 x 4 = 64 px for the real model): below that the
    K-UNet's bottom level is 1 px wide (its reflect padding needs 2)."""
    return 2 * _vae_factor(model.vae) * latent_multiple(model.unet)


def latent_size(model, size: tuple[int, int], latent: tuple[int, int] | None = None, scale: float = 2,
                settings=None) -> tuple[int, int]:
    """The 2x latent: twice a latents file's ``latent``, or twice the SD latent of the image padded to the
    K-UNet's multiple."""
    if latent is not None:
        return 2 * latent[0], 2 * latent[1]
    unit, m = _vae_factor(model.vae) * latent_multiple(model.unet), latent_multiple(model.unet)
    return 2 * m * -(-size[0] // unit), 2 * m * -(-size[1] // unit)


def tile_multiple(model) -> int:
    return 2 * latent_multiple(model.unet)


def meta_model():
    """The official sd-x2-latent-upscaler on the meta device: K-UNet, CLIP ViT-L/14, SD VAE (the dry run)."""
    out = LoadedModel(family="x2", source="official sd-x2-latent-upscaler configuration",
                      prediction=FAMILY_DEFAULTS["x2"]["prediction"])
    with torch.device("meta"):
        out.unet, out.vae = KUNet(KUNetConfig()), AutoencoderKL(VAEConfig())
        out.text_encoder = TextEncoder(KNOWN_TEXT_CONFIGS["openai/clip-vit-large-patch14"])
    out.configs = {"unet": out.unet.cfg, "vae": out.vae.cfg}
    return out


def attach_vae(model, opts, load) -> None:
    """``--vae`` (an SD 1.x / 2.x checkpoint or VAE) for encoding / decoding, or the checkpoint's own vae/; an SD 1.x
    checkpoint also supplies the text encoder the original k-diffusion file lacks."""
    if opts.vae:
        family = inspect(Path(opts.vae))[0].family
        if family not in SD_VAE_FAMILIES:
            raise ValueError(f"--vae {opts.vae}: a {family} checkpoint; the x2 upscaler needs the SD 1.x / 2.x VAE "
                             "(an SD checkpoint or VAE)")
        other = load(opts.vae)
        if other.vae is None:
            raise ValueError(f"--vae {opts.vae}: no VAE in it ({other.family} checkpoint)")
        cfg = getattr(other.vae, "cfg", None)
        if cfg is not None and (cfg.embed_dim != 4 or other.family not in SD_VAE_FAMILIES):
            raise ValueError(f"--vae {opts.vae}: a {other.family} VAE with {cfg.embed_dim} latent channels; the x2 "
                             "upscaler needs the SD 1.x / 2.x VAE (4 channels, f=8)")
        model.vae = other.vae
        if model.text_encoder is None and other.family == "sd1" and other.text_encoder is not None:
            model.text_encoder, model.tokenizer = other.text_encoder, other.tokenizer  # k-diffusion file: CLIP-L
    if model.vae is None:
        raise ValueError(f"{opts.weights} has no VAE (the original k-diffusion file ships the K-UNet only): pass --vae "
                         "with an SD 1.x / 2.x checkpoint or VAE (see weights/README.md)")
    if model.text_encoder is None:
        raise ValueError(f"{opts.weights} has no text encoder (the original k-diffusion file ships the K-UNet only): "
                         "pass --vae with an SD 1.x checkpoint (its CLIP ViT-L/14 text encoder is used too)")


UPSCALER = Upscaler(
    name="x2", family="x2", title="the x2 latent upscaler", scale=2, defaults=DEFAULTS, settings=cli_settings,
    check_options=check_options, job=cli_job, min_side=min_side, latent_size=latent_size, tile_multiple=tile_multiple,
    unet_bytes=kunet_bytes, describe=lambda s: f"noise level {s['noise_level']:g}",
    expected_files="the stabilityai/sd-x2-latent-upscaler diffusers folder, or "
                   "laion_text_cond_latent_upscaler_2_1_00470000_slim.pth",
    attach=attach_vae, read_latents=read_latents, meta_model=meta_model)
