"""StableSR: diffusion super-resolution with an SD 2.1 finetune (IceClear/StableSR).

    model = sdup.load("stablesr_000117.ckpt")          # UNet with SFT layers + time-aware encoder + SD VAE + OpenCLIP
    cfw = sdup.load("vqgan_cfw_00011.ckpt")            # the CFW autoencoder (encoder features -> decoder fusion)
    out = upscale_stablesr(model, cfw, low_res, steps=200, dec_w=0.5, seed=42)
    out.images      # (B, 3, s*h, s*w) in [0, 1]
    out.latents     # (B, 4, H/8, W/8) sampler output (scaled latents of the padded, upsampled image)
    out.parameters  # everything needed to reproduce the run

What it computes (the reference ``scripts/sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py``; DDIM with a negative prompt
= ``sr_val_ddim_text_T_negativeprompt_canvas_tile.py``):

1. LR image (B, 3, h, w) -> [-1, 1]; s = max(input_size / min(h, w), scale) (input_size 512, 768 for the 768-v model);
   bicubic upsampling by s (``F.interpolate``, no antialias), clamp to [-1, 1]; reflect padding bottom / right to a
   multiple of 32.
2. Encode: the CFW encoder gives the posterior and the encoder features (for the decoder's fusion); z_lr =
   scale_factor * posterior SAMPLE (stochastic, as upstream; generator of each sample).  Without a CFW VAE the
   model's own SD VAE encodes (and decodes, w/o fusion).
3. Start latent: ``start="lr"`` (reference B): x_T = sqrt(ac[999]) z_lr + sqrt(1 - ac[999]) eps with the original
   1000-step tables; ``start="noise"`` (references A, C): x_T = eps.
4. Each step the time-aware encoder runs on z_lr at the step's (original-chain) timestep, its per-resolution features
   modulate the UNet's ResBlocks (SFT); the network output (eps or v) is guided with the negative prompt when
   ``guidance != 1``.  ``sampler="ddpm"`` (default): ancestral DDPM on the chain respaced to ``steps`` timesteps
   ``space_timesteps(1000, [steps])``; ``"ddim"``: DDIM with the reference's quirk (alphas of the offset-0 grid
   0, c, 2c, ... while the networks get the ``space_timesteps`` values).
5. ``tile``: the UNet (and the time-aware encoder, on the matching crop of z_lr) run on overlapping latent tiles
   (``tiling.TiledModel``: input_size / 8 = 64 latent px with overlap 32 upstream), blended with Gaussian weights
   (``weights="reference"``: StableSR's off-centre formula; default "symmetric") before every sampler update.
6. Decode: CFW decoder with the encoder features and fidelity weight ``dec_w`` (0 = the plain SD decoder's
   look, 1 = closest to the input); colour fix (wavelet by default, as the turbo README; "adain" / "none") against
   the upsampled LR image; crop the padding; if s > scale resize (bicubic, antialiased) down by scale / s; clamp.

Random numbers: one generator per sample (seed + i) drawing, in order, the posterior noise, x_T's eps and the per-step
noise (DDPM).  Upstream draws from one global generator for the batch, so sdup reproduces its *procedure*, not its
random stream (the sampler parity with upstream is tested with supplied noise: tests/test_samplers.py).
Large outputs: ``vae_tile`` decodes with ``tiling.tiled_decode(cfw, z, fuse_inputs=cfw.fuse_inputs(features, dec_w))``,
exact (whole-image GroupNorm statistics; the encoder features cut to each tile), in bounded memory, and split over
the ranks of a process group. Upstream instead decodes images above 1280 px in overlapping pixel-space tiles
(``vqgantile_size``), which changes the result; sdup does not reproduce that.

Arguments of ``prepare_stablesr`` (and of the wrapper ``upscale_stablesr``, which takes the same):
    cfw_vae: the CFW autoencoder (LoadedModel or module) or None (the model's plain VAE; ``dec_w`` then unused).
    prompt / negative_prompt: text or token ids; the reference uses "" (guidance applies only when != 1).
    prompt_embeds / negative_embeds: precomputed text-encoder contexts (77, D) or (B, 77, D) instead of text
        (``conditioning.check_prompts``: the one rule of every pipeline).
    steps: respaced DDPM steps (default 200 as the reference; the turbo checkpoint 4) or DDIM steps (default 50);
    sampler "ddpm" | "ddim".  guidance: CFG scale on the network output (default 1 for ddpm, 7 for ddim as the DDIM
    script).  dec_w: CFW fidelity weight 0..1; start: "lr" | "noise"; input_size: the model's native size (default
    512, 768 for a 768-v model): inputs smaller than that are upsampled more and resized down at the end.
    x_T: (B, 4, H/8, W/8) unit-variance noise for the start (the eps of ``start="lr"``), else drawn.
    tile, tile_overlap, tile_batch, weights: latent tiling (``tiling.TiledModel``; None = whole latent).
    vae_tile, vae_overlap: decode in latent tiles (``tiling.tiled_decode``, exact; None = the whole latent at once).
    vae_dtype: the decode's dtype (None: the VAE's own; ``decoding.decode_scaled``: a non-finite half-precision
        decode is redone in fp32, tiled decodes run in fp32).
    plan: a ``tiling.TilePlan`` for the padded latent instead of the tile arguments (the command line's).
Step by step: ``job = prepare_stablesr(...)``, ``latents = sample(job)``, ``finish(job, latents)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..checkpoints.loader import inspect
from ..diffusion.denoisers import CFG, DiscreteDenoiser
from ..diffusion.samplers import get_sampler, randn
from ..diffusion.schedules import ddim_timesteps, ldm_buffers, schedule_betas, space_timesteps
from ..images import note
from ..tiling import TilePlan
from ..tiling.memory import ldm_unet_bytes
from ..tiling.plan import TileDefaults
from .checks import check_guidance, check_images, check_int, pad_to_multiple
from .conditioning import check_prompts, record_prompts, text_contexts
from .decoding import decode_scaled, recorded_dtype
from .job import Job, base_parameters, check_color_fix, guided, run, start_noise, tile_plan
from .result import Result
from .seeds import resolve_generators
from .upscaler import Upscaler

Tensor = torch.Tensor
SAMPLERS = ("ddpm", "ddim")   # the reference scripts' samplers (DDIM with its timestep quirk, see stablesr_denoiser)
STARTS = ("lr", "noise")


@dataclass(frozen=True)
class Defaults:
    """The reference scripts' values: DDPM 200 steps without guidance; the DDIM script 50 steps, guidance 7."""
    sampler: str = "ddpm"
    steps: int = 200
    guidance: float = 1.0
    ddim_steps: int = 50
    ddim_guidance: float = 7.0
    dec_w: float = 0.5
    color_fix: str = "wavelet"
    start: str = "lr"
    input_size: int = 512
    tile_overlap: int = 32

    def steps_for(self, sampler: str, steps: int | None = None) -> int:
        return steps if steps is not None else (self.ddim_steps if sampler == "ddim" else self.steps)

    def guidance_for(self, sampler: str, guidance: float | None = None) -> float:
        return guidance if guidance is not None else (self.ddim_guidance if sampler == "ddim" else self.guidance)


DEFAULTS = Defaults()
PAD_MULTIPLE = 32
LATENT_MULTIPLE = 8   # latent tiles are multiples of this (the SFT UNet's downsampling)


def stablesr_network(model) -> Callable:
    """``net(x, t, context, lr)``: the time-aware encoder on the low-res latent ``lr`` at timestep t, its features
    into the SFT UNet.  x / lr (B, 4, h, w) (tiles of the same place when tiled), t (B,) original-chain timesteps."""
    unet, encoder = model.unet, model.struct_encoder
    p = next(unet.parameters())

    def net(x: Tensor, t: Tensor, context: Tensor, lr: Tensor) -> Tensor:
        x, lr, context = x.to(p.device, p.dtype), lr.to(p.device, p.dtype), context.to(p.device, p.dtype)
        t = t.to(p.device)
        return unet(x, t, context, features=encoder(lr, t)).float()
    return net


def stablesr_denoiser(model, guidance: float, sampler: str, steps: int, plan: TilePlan | None = None,
                      progress: bool = False) -> tuple[DiscreteDenoiser, Tensor | None]:
    """(denoiser, DDIM timesteps or None) for the reference samplers: ``ddpm`` = the chain respaced to
    ``space_timesteps(1000, [steps])``; ``ddim`` = the offset-0 alpha grid with the network timesteps mapped to
    ``space_timesteps``: the reference DDIM script's quirk); ``plan``: its latent tiles (None: untiled)."""
    net = plan.wrap(stablesr_network(model), progress) if plan is not None else stablesr_network(model)
    den = DiscreteDenoiser(CFG(net, float(guidance)), schedule_betas(model.schedule), model.prediction)
    T = den.num_timesteps
    spaced = space_timesteps(T, [steps])
    if sampler == "ddpm":
        return den.respaced(spaced), None
    alpha_ts = ddim_timesteps(steps, T, offset=0)
    if len(alpha_ts) != len(spaced):  # the reference's uniform grid range(0, T, T // steps) has another length
        raise ValueError(f"DDIM with {steps} steps: the reference's grid range(0, {T}, {T // steps}) has "
                         f"{len(alpha_ts)} entries, not {steps}; use a step count with T // steps * steps close to {T} "
                         "(e.g. 10, 20, 25, 50, 100, 200)")
    tmap = torch.arange(T)
    tmap[alpha_ts] = torch.tensor(spaced)
    return den.with_timestep_map(tmap), alpha_ts.flip(0)


def check_options(model=None, cfw_vae=None, *, sampler: str = DEFAULTS.sampler, steps: int | None = None,
                  guidance: float | None = None, dec_w: float = DEFAULTS.dec_w, scale: float = 4.0,
                  start: str = DEFAULTS.start, input_size: int | None = None,
                  color_fix_mode: str = DEFAULTS.color_fix, vae_tile: int | None = None, vae_overlap: int = 8) -> None:
    """The options that need no image checked (ValueError); ``prepare_stablesr`` and the CLI (before loading any
    weights: ``model`` None) use it."""
    if model is not None and (getattr(model, "family", None) != "stablesr"
                              or getattr(model, "struct_encoder", None) is None or model.unet is None):
        raise ValueError(f"upscale_stablesr needs a StableSR checkpoint (SFT UNet + time-aware encoder, e.g. "
                         f"stablesr_000117.ckpt), got a {getattr(model, 'family', type(model).__name__)} model")
    if cfw_vae is not None and type(getattr(cfw_vae, "vae", cfw_vae)).__name__ != "CFWAutoencoder":
        raise ValueError("cfw_vae must be the StableSR CFW autoencoder (vqgan_cfw_00011.ckpt loaded with sdup.load)"
                         f", got {getattr(cfw_vae, 'family', type(getattr(cfw_vae, 'vae', cfw_vae)).__name__)}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler}: StableSR samples with {' or '.join(SAMPLERS)} (the reference scripts)")
    steps = check_int("steps", DEFAULTS.steps_for(sampler, steps))
    T = model.schedule.get("timesteps", 1000) if model is not None else 1000
    if steps > T:
        raise ValueError(f"steps must be at most {T}, got {steps}")
    check_guidance(DEFAULTS.guidance_for(sampler, guidance))
    if not isinstance(dec_w, (int, float)) or not 0 <= dec_w <= 1:
        raise ValueError(f"dec_w must be in 0..1 (the CFW fidelity weight), got {dec_w!r}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or not 1 <= scale <= 16:
        raise ValueError(f"scale must be a number in 1..16, got {scale!r}")
    if start not in STARTS:
        raise ValueError(f"start must be 'lr' (noised LR latent, reference default) or 'noise', got {start!r}")
    check_color_fix(color_fix_mode)
    if vae_tile is not None:
        check_int("vae_tile", vae_tile)
        if check_int("vae_overlap", vae_overlap, lo=0) >= vae_tile:
            raise ValueError(f"vae_overlap ({vae_overlap}) must be smaller than vae_tile ({vae_tile})")
    if input_size is not None and (isinstance(input_size, bool) or not isinstance(input_size, int)
                                   or not 8 <= input_size <= 4096):
        raise ValueError(f"input_size must be an integer in 8..4096, got {input_size!r}")


def upsampled_size(model, size: tuple[int, int], scale: float, input_size: int | None = None) -> tuple[int, int]:
    """(H, W) of the bicubic-upsampled LR image of ``size`` (h, w): s = max(input_size / min(h, w), scale)."""
    if input_size is None:
        input_size = 768 if getattr(model, "prediction", None) == "v" else DEFAULTS.input_size
    s = max(input_size / min(size), float(scale))
    return round(size[0] * s), round(size[1] * s)


def prepare_stablesr(model, cfw_vae, image: Tensor, prompt: str | Sequence[str] | Tensor | None = "",
                     negative_prompt: str | Sequence[str] | Tensor = "", *, prompt_embeds: Tensor | None = None,
                     negative_embeds: Tensor | None = None, scale: float = 4.0, steps: int | None = None,
                     sampler: str = DEFAULTS.sampler, guidance: float | None = None, dec_w: float = DEFAULTS.dec_w,
                     start: str = DEFAULTS.start, input_size: int | None = None, seed: int | Sequence[int] | None = 42,
                     generator: torch.Generator | Sequence[torch.Generator] | None = None,
                     x_T: Tensor | None = None, tile: int | None = None, tile_overlap: int = DEFAULTS.tile_overlap,
                     tile_batch: int = 1, weights: str = "symmetric", color_fix_mode: str = DEFAULTS.color_fix,
                     vae_tile: int | None = None, vae_overlap: int = 8, plan: TilePlan | None = None,
                     vae_dtype: torch.dtype | None = None,
                     callback: Callable[[dict], None] | None = None, progress: bool = True) -> Job:
    """The StableSR ``Job`` for (B, 3, h, w) images in [0, 1] upscaled by ``scale`` with a StableSR ``LoadedModel``:
    the arguments are in the module docstring; ``upscale_stablesr`` = ``finish(job, sample(job))``."""
    check_options(model, cfw_vae, sampler=sampler, steps=steps, guidance=guidance, dec_w=dec_w, scale=scale,
                  start=start, input_size=input_size, color_fix_mode=color_fix_mode, vae_tile=vae_tile,
                  vae_overlap=vae_overlap)
    steps, guidance = DEFAULTS.steps_for(sampler, steps), DEFAULTS.guidance_for(sampler, guidance)
    prompts = check_prompts(prompt, negative_prompt, prompt_embeds, negative_embeds)
    low = check_images(image)                                         # (B, 3, h, w) in [-1, 1]
    if min(low.shape[-2:]) < 8:
        raise ValueError(f"the image is {low.shape[-1]}x{low.shape[-2]}; StableSR needs at least 8x8")
    batch, (h, w) = low.shape[0], tuple(low.shape[-2:])
    input_size = input_size or (768 if model.prediction == "v" else DEFAULTS.input_size)
    padded, (H, W), padding = _upsample(model, low, scale, input_size)
    seeds, generators = resolve_generators(seed, generator, batch)
    cfw = getattr(cfw_vae, "vae", cfw_vae) if cfw_vae is not None else None
    z_lr, feats = _encode(cfw or model.vae, cfw is not None, padded, generators, model.scale_factor)
    device = next(model.unet.parameters()).device
    x_T = _start(model, z_lr, start, x_T, generators)
    cond, uncond = text_contexts(model, prompts, batch, guided(guidance), device)
    cond["lr"] = z_lr.to(device)
    plan = tile_plan(plan, z_lr.shape[-2:], tile, tile_overlap, vae_tile, vae_overlap, LATENT_MULTIPLE,
                     tile_batch=tile_batch, weights=weights)
    den, ddim_ts = stablesr_denoiser(model, guidance, sampler, steps, plan, progress)
    spec = get_sampler(sampler)
    oh, ow = round(h * scale), round(w * scale)
    params = base_parameters("stablesr", model, steps, guidance, batch)
    params.update(cfw_vae=str(getattr(cfw_vae, "source", "module")) if cfw_vae is not None else None,
                  prediction=model.prediction, dec_w=float(dec_w) if cfw is not None else None, start=start,
                  scale=float(scale), input_size=[h, w], output_size=[oh, ow], upsampled_size=[H, W],
                  native_size=input_size, scale_factor=model.scale_factor, color_fix=color_fix_mode,
                  vae_dtype=recorded_dtype(cfw or model.vae, vae_dtype, plan.vae_tile), padding=padding)
    params["timesteps"] = space_timesteps(1000, [steps])[::-1]
    record_prompts(params, prompts, batch, guidance, seeds)
    decode = _cfw_decoding(model, cfw, feats, dec_w, plan.vae_tile, plan.vae_overlap, vae_dtype, progress)
    return Job(sampler=spec, denoiser=den, x_T=x_T.to(device), grid=ddim_ts, extra_args=dict(cond=cond, uncond=uncond),
               options=spec.options(0.0), generators=generators, callback=callback, progress=progress, plan=plan,
               decode=decode, color_fix=color_fix_mode, color_ref=padded.cpu(), crop=(H, W), resize=(oh, ow),
               parameters={k: v for k, v in params.items() if v is not None})


def _upsample(model, low: Tensor, scale: float, input_size: int) -> tuple[Tensor, tuple[int, int], dict | None]:
    """(the bicubic-upsampled image padded to a multiple of 32, its size (H, W) before padding, the padding record or
    None): reflect padding as upstream, replicate where reflecting is impossible."""
    up = F.interpolate(low, size=upsampled_size(model, tuple(low.shape[-2:]), scale, input_size), mode="bicubic",
                       align_corners=False).clamp(-1, 1)
    H, W = up.shape[-2:]
    pad_mode = "reflect" if (-H) % PAD_MULTIPLE < H and (-W) % PAD_MULTIPLE < W else "replicate"
    padded, (ph, pw) = pad_to_multiple(up, PAD_MULTIPLE, pad_mode, "upsampled image")
    return padded, (H, W), ({"mode": pad_mode, "bottom": ph, "right": pw} if ph or pw else None)


def _start(model, z_lr: Tensor, start: str, x_T: Tensor | None, generators) -> Tensor:
    """The start latent: the noise itself (``start="noise"``) or q(x_999 | z_lr) with the original 1000-step tables."""
    x_T = start_noise(x_T, z_lr.shape, generators, z_lr.device, " (the padded, upsampled image / 8)")
    if start != "lr":
        return x_T
    a = float(ldm_buffers(schedule_betas(model.schedule))["alphas_cumprod"][-1])
    return math.sqrt(a) * z_lr + math.sqrt(1 - a) * x_T


def _encode(vae, is_cfw: bool, padded: Tensor, generators, scale_factor: float) -> tuple[Tensor, list]:
    """(z_lr = scale_factor * posterior sample, the CFW encoder features per sample (None without CFW))."""
    gens = generators if isinstance(generators, (list, tuple)) else [generators] * padded.shape[0]
    vp = next(vae.parameters())
    z_lr, feats = [], []
    for i in range(padded.shape[0]):
        xi = padded[i:i + 1].to(vp.device, vp.dtype)
        post, f = vae.encode(xi) if is_cfw else (vae.encode(xi), None)
        z_lr.append(scale_factor * post.sample(noise=randn(post.mean.shape, [gens[i]]).to(post.mean)).float())
        feats.append(f)
    return torch.cat(z_lr), feats                                     # (B, 4, H'/8, W'/8)


def _cfw_decoding(model, cfw, feats: list, dec_w: float, vae_tile: int | None = None, vae_overlap: int = 8,
                  vae_dtype: torch.dtype | None = None, progress: bool = False) -> Callable[[Tensor], Tensor]:
    """latents -> [-1, 1] images (``decoding.decode_scaled``): the CFW decoder fusing each sample's encoder features
    with weight ``dec_w`` (the model's plain VAE without CFW), in the VAE's own dtype unless ``vae_dtype``."""
    vae, features = (cfw, feats) if cfw is not None else (model.vae, None)
    return lambda z: decode_scaled(vae, z, model.scale_factor, vae_tile=vae_tile, vae_overlap=vae_overlap,
                                   progress=progress, vae_dtype=vae_dtype, features=features, dec_w=dec_w)


@torch.inference_mode()
def upscale_stablesr(model, cfw_vae, image: Tensor, prompt: str | Sequence[str] | Tensor | None = "",
                     negative_prompt: str | Sequence[str] | Tensor = "", *, group=None, **options) -> Result:
    """Super-resolve images: ``finish(job, sample(job))`` of ``prepare_stablesr`` (same arguments) under
    ``torch.inference_mode()``.  Returns ``Result(images (B, 3, s*h, s*w) in [0, 1], latents, parameters)``."""
    job = prepare_stablesr(model, cfw_vae, image, prompt, negative_prompt, **options)
    return run(job, group)


# ------------------------------------------------------------------------------------------------
# the command line's record (sdup.pipelines.upscaler)


def cli_settings(opts) -> dict:
    """The StableSR options of the command line, ``DEFAULTS`` where not given (steps and guidance: the sampler's)."""
    if opts.noise_level is not None or opts.schedule:
        raise ValueError("--noise-level / --schedule are not options of StableSR")
    D, sampler = DEFAULTS, opts.sampler or DEFAULTS.sampler
    return dict(sampler=sampler, steps=D.steps_for(sampler, opts.steps), guidance=D.guidance_for(sampler, opts.guidance),
                dec_w=D.dec_w if opts.dec_w is None else opts.dec_w, start=opts.start or D.start,
                scale=4.0 if opts.scale is None else opts.scale, input_size=opts.input_size)


def cli_job(model, image: Tensor | None = None, latents=None, vae_dtype=None, **options) -> Job:
    """The job of one input image (1, 3, h, w) with the CFW autoencoder ``attach_cfw`` found (the CFW VAE decodes
    in the model's dtype: no ``vae_dtype``)."""
    return prepare_stablesr(model, getattr(model, "cfw_vae", None), image, **options)


def latent_size(model, size: tuple[int, int], latent=None, scale: float = 4.0, settings=None) -> tuple[int, int]:
    """The latent of the upsampled image padded to ``PAD_MULTIPLE`` (the VAE's factor f: 8 for the real model)."""
    H, W = upsampled_size(model, size, scale, (settings or {}).get("input_size"))
    f = model.vae.cfg.downscale
    return -(-H // PAD_MULTIPLE) * PAD_MULTIPLE // f, -(-W // PAD_MULTIPLE) * PAD_MULTIPLE // f


def attach_cfw(model, opts, load) -> None:
    """The CFW autoencoder from ``--vae`` (vqgan_cfw_00011.ckpt) as ``model.cfw_vae``; without it the plain SD VAE
    decodes (a note says so)."""
    model.cfw_vae = None
    if not opts.vae:
        note("no --vae: decoding with the checkpoint's plain SD VAE (no CFW fusion, --dec-w unused); the reference "
             "uses vqgan_cfw_00011.ckpt")
        return
    family = inspect(Path(opts.vae))[0].family
    if family != "stablesr_cfw_vae":
        raise ValueError(f"--vae {opts.vae}: a {family} checkpoint; StableSR needs its CFW autoencoder "
                         "(vqgan_cfw_00011.ckpt)")
    model.cfw_vae = load(opts.vae)


UPSCALER = Upscaler(
    name="stablesr", family="stablesr", title="StableSR", scale=4, defaults=DEFAULTS, settings=cli_settings,
    check_options=check_options, job=cli_job, min_side=lambda model: 8, latent_size=latent_size,
    tile_multiple=lambda model: LATENT_MULTIPLE, unet_bytes=ldm_unet_bytes,
    describe=lambda s: f"dec_w {s['dec_w']:g}, start {s['start']}",
    expected_files="stablesr_000117.ckpt (or stablesr_768v_000139.ckpt) + vqgan_cfw_00011.ckpt (Iceclear/StableSR)",
    tiles=TileDefaults(tile=64, overlap=32, overlap_share=2, tile_batch=1, weights="symmetric"),
    color_fix=DEFAULTS.color_fix, variable_scale=True, own_options=("dec_w", "scale", "start", "input_size"),
    attach=attach_cfw, config_hint="v2-finetune_text_T_512.yaml")
