"""StableSR: diffusion super-resolution with an SD 2.1 finetune (SPEC §5.6, §5.7; IceClear/StableSR).

    model = sdup.load("stablesr_000117.ckpt")          # UNet with SFT layers + time-aware encoder + SD VAE + OpenCLIP
    cfw = sdup.load("vqgan_cfw_00011.ckpt")            # the CFW autoencoder (encoder features -> decoder fusion)
    out = upscale_stablesr(model, cfw, low_res, steps=200, dec_w=0.5, seed=42)
    out.images      # (B, 3, s*h, s*w) in [0, 1]
    out.latents     # (B, 4, H/8, W/8) sampler output (scaled latents of the padded, upsampled image)
    out.parameters  # everything needed to reproduce the run

What it computes (the reference ``scripts/sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py``, SPEC §5.6 B; DDIM with a
negative prompt = ``sr_val_ddim_text_T_negativeprompt_canvas_tile.py``, §5.6 C):

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
Not here: upstream's pixel-space tiling of images above 1280 px (``vqgantile_size``): large outputs are decoded whole
(the CFW fusion needs full-resolution encoder features; tiling.tiled_decode cannot fuse them).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .. import __version__
from ..diffusion import samplers as S
from ..diffusion.denoisers import CFG, DiscreteDenoiser
from ..diffusion.samplers import randn
from ..diffusion.schedules import ddim_timesteps, ldm_buffers, schedule_betas, space_timesteps
from .colorfix import COLOR_FIX_MODES, color_fix
from .common import Result, check_finite, check_int, pad_to_multiple, prompt_context, record_prompts, resolve_generators

Tensor = torch.Tensor
SAMPLERS = ("ddpm", "ddim")
STARTS = ("lr", "noise")
DEFAULTS = dict(steps=200, sampler="ddpm", guidance=1.0, ddim_guidance=7.0, dec_w=0.5, color_fix="wavelet",
                start="lr", input_size=512, tile_overlap=32)
PAD_MULTIPLE = 32


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


def stablesr_denoiser(model, guidance: float, sampler: str, steps: int, tile: int | None = None,
                      tile_overlap: int = 32, tile_batch: int = 1, weights: str = "symmetric",
                      progress: bool = False) -> tuple[DiscreteDenoiser, Tensor | None]:
    """(denoiser, DDIM timesteps or None) for the reference samplers: ``ddpm`` = the chain respaced to
    ``space_timesteps(1000, [steps])``; ``ddim`` = the offset-0 alpha grid with the network timesteps mapped to
    ``space_timesteps`` (SPEC §5.6 C quirk)."""
    net = stablesr_network(model)
    if tile:
        from .tiling import TiledModel
        t = max(8, tile - tile % 8)  # the SD UNet halves the latent 3 times
        net = TiledModel(net, tile=t, overlap=min(tile_overlap, t - 8), tile_batch=tile_batch, weights=weights,
                         progress=progress)
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


def _check(model, cfw_vae, dec_w, scale, sampler, start, color_fix_mode):
    if getattr(model, "family", None) != "stablesr" or getattr(model, "struct_encoder", None) is None \
            or model.unet is None:
        raise ValueError(f"upscale_stablesr needs a StableSR checkpoint (SFT UNet + time-aware encoder, e.g. "
                         f"stablesr_000117.ckpt), got a {getattr(model, 'family', type(model).__name__)} model")
    if cfw_vae is not None:
        vae = getattr(cfw_vae, "vae", cfw_vae)
        if type(vae).__name__ != "CFWAutoencoder":
            raise ValueError("cfw_vae must be the StableSR CFW autoencoder (vqgan_cfw_00011.ckpt loaded with sdup.load)"
                             f", got {getattr(cfw_vae, 'family', type(vae).__name__)}")
    if not isinstance(dec_w, (int, float)) or not 0 <= dec_w <= 1:
        raise ValueError(f"dec_w (the CFW fidelity weight) must be in 0..1, got {dec_w!r}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or not 1 <= scale <= 16:
        raise ValueError(f"scale must be a number in 1..16, got {scale!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"StableSR samples with {' or '.join(SAMPLERS)} (the reference scripts), got {sampler!r}")
    if start not in STARTS:
        raise ValueError(f"start must be 'lr' (noised LR latent, reference default) or 'noise', got {start!r}")
    if color_fix_mode not in COLOR_FIX_MODES:
        raise ValueError(f"unknown colour fix {color_fix_mode!r} (choose from {', '.join(COLOR_FIX_MODES)})")


def _images(image) -> Tensor:
    if not isinstance(image, Tensor) or not image.is_floating_point() or image.ndim not in (3, 4) \
            or image.shape[-3] != 3:
        raise ValueError("image must be a float tensor (B, 3, h, w) or (3, h, w) in [0, 1] (RGB; split alpha off), got "
                         + (str(tuple(image.shape)) if isinstance(image, Tensor) else type(image).__name__))
    x = image[None] if image.ndim == 3 else image
    if min(x.shape[-2:]) < 8:
        raise ValueError(f"the image is {x.shape[-1]}x{x.shape[-2]}; StableSR needs at least 8x8")
    return x.float() * 2 - 1


def upsampled_size(model, size: tuple[int, int], scale: float, input_size: int | None = None) -> tuple[int, int]:
    """(H, W) of the bicubic-upsampled LR image of ``size`` (h, w): s = max(input_size / min(h, w), scale)."""
    if input_size is None:
        input_size = 768 if getattr(model, "prediction", None) == "v" else DEFAULTS["input_size"]
    s = max(input_size / min(size), float(scale))
    return round(size[0] * s), round(size[1] * s)


@torch.inference_mode()
def upscale_stablesr(model, cfw_vae, image: Tensor, prompt: str | Sequence[str] | Tensor | None = "",
                     negative_prompt: str | Sequence[str] | Tensor = "", *, scale: float = 4.0, steps: int = 200,
                     sampler: str = "ddpm", guidance: float | None = None, dec_w: float = 0.5, start: str = "lr",
                     input_size: int | None = None, seed: int | Sequence[int] | None = 42,
                     generator: torch.Generator | Sequence[torch.Generator] | None = None,
                     x_T: Tensor | None = None, tile: int | None = None, tile_overlap: int = 32, tile_batch: int = 1,
                     weights: str = "symmetric", color_fix_mode: str = "wavelet",
                     callback: Callable[[dict], None] | None = None, progress: bool = True) -> Result:
    """Super-resolve (B, 3, h, w) images in [0, 1] by ``scale`` with a StableSR ``LoadedModel`` (module docstring).

    cfw_vae: the CFW autoencoder (LoadedModel or module) or None (the model's plain VAE; ``dec_w`` then unused).
    prompt / negative_prompt: text or token ids; the reference uses "" (guidance applies only when != 1).
    steps: respaced DDPM steps (reference 200; the turbo checkpoint 4) or DDIM steps; sampler "ddpm" | "ddim".
    guidance: CFG scale on the network output (default 1 for ddpm, 7 for ddim as the DDIM script).
    dec_w: CFW fidelity weight 0..1; start: "lr" | "noise"; input_size: the model's native size (default 512, 768
    for a 768-v model): inputs smaller than that are upsampled more and resized down at the end.
    x_T: (B, 4, H/8, W/8) unit-variance noise for the start (the eps of ``start="lr"``), else drawn.
    tile, tile_overlap, tile_batch, weights: latent tiling (``tiling.TiledModel``; None = whole latent).
    """
    spec_guidance = DEFAULTS["ddim_guidance"] if sampler == "ddim" else DEFAULTS["guidance"]
    guidance = spec_guidance if guidance is None else guidance
    _check(model, cfw_vae, dec_w, scale, sampler, start, color_fix_mode)
    steps = check_int("steps", steps)
    check_finite("guidance", guidance)
    if steps > model.schedule.get("timesteps", 1000):
        raise ValueError(f"steps must be at most {model.schedule.get('timesteps', 1000)}, got {steps}")
    low = _images(image)                                              # (B, 3, h, w) in [-1, 1]
    batch, (h, w) = low.shape[0], tuple(low.shape[-2:])
    if input_size is None:
        input_size = 768 if model.prediction == "v" else DEFAULTS["input_size"]
    up = F.interpolate(low, size=upsampled_size(model, (h, w), scale, input_size), mode="bicubic",
                       align_corners=False).clamp(-1, 1)
    H, W = up.shape[-2:]
    pad_mode = "reflect" if (-H) % PAD_MULTIPLE < H and (-W) % PAD_MULTIPLE < W else "replicate"  # reflect as upstream
    padded, (ph, pw) = pad_to_multiple(up, PAD_MULTIPLE, pad_mode, "upsampled image")
    seeds, generators = resolve_generators(seed, generator, batch)
    gens = generators if isinstance(generators, (list, tuple)) else [generators] * batch

    # encode (CFW: posterior sample + features for the decoder's fusion)
    cfw = getattr(cfw_vae, "vae", cfw_vae) if cfw_vae is not None else None
    vae = cfw if cfw is not None else model.vae
    vp = next(vae.parameters())
    z_lr, feats = [], []
    for i in range(batch):
        xi = padded[i:i + 1].to(vp.device, vp.dtype)
        post, f = vae.encode(xi) if cfw is not None else (vae.encode(xi), None)
        z_lr.append(model.scale_factor * post.sample(noise=randn(post.mean.shape, [gens[i]]).to(post.mean)).float())
        feats.append(f)
    z_lr = torch.cat(z_lr)                                            # (B, 4, H'/8, W'/8)
    shape = tuple(z_lr.shape)
    if x_T is None:
        x_T = randn(shape, generators)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have shape {shape} (the padded, upsampled image / 8), got {tuple(x_T.shape)}")
    x_T = x_T.float().to(z_lr.device)
    if start == "lr":  # q(x_999 | z_lr) with the original 1000-step tables
        ac = ldm_buffers(schedule_betas(model.schedule))["alphas_cumprod"]
        a = float(ac[-1])
        x_T = math.sqrt(a) * z_lr + math.sqrt(1 - a) * x_T

    # sample
    device = next(model.unet.parameters()).device
    cond = dict(context=prompt_context(model, prompt, None, batch, "prompt").to(device), lr=z_lr.to(device))
    uncond = None
    if guidance != 1:
        uncond = dict(context=prompt_context(model, negative_prompt, None, batch, "negative_prompt").to(device))
    den, ddim_ts = stablesr_denoiser(model, guidance, sampler, steps, tile, tile_overlap, tile_batch, weights, progress)
    kw = dict(extra_args=dict(cond=cond, uncond=uncond), generator=generators, callback=callback,
              disable=not progress)
    if sampler == "ddpm":
        latents = S.sample_ddpm(den, x_T.to(device), None, **kw).float()
    else:
        latents = S.sample_ddim(den, x_T.to(device), ddim_ts, **kw).float()

    # decode (CFW fusion with dec_w), colour fix, crop, resize down
    out = []
    for i in range(batch):
        z = (latents[i:i + 1] / model.scale_factor).to(vp.device, vp.dtype)
        out.append((vae.decode(z, feats[i], float(dec_w)) if cfw is not None else vae.decode(z)).float().cpu())
    out = torch.cat(out)
    if color_fix_mode != "none":
        out = color_fix(out, padded.cpu(), color_fix_mode)
    out = out[..., :H, :W]
    oh, ow = round(h * scale), round(w * scale)
    if (H, W) != (oh, ow):
        out = F.interpolate(out, size=(oh, ow), mode="bicubic", align_corners=False, antialias=True)
    images = ((out + 1) / 2).clamp(0, 1)

    params = {
        "pipeline": "stablesr", "sdup_version": __version__, "model": str(model.source), "family": model.family,
        "cfw_vae": str(getattr(cfw_vae, "source", "module")) if cfw_vae is not None else None,
        "prediction": model.prediction, "sampler": sampler, "steps": steps, "guidance": float(guidance),
        "dec_w": float(dec_w) if cfw is not None else None, "start": start, "scale": float(scale),
        "input_size": [h, w], "output_size": [oh, ow], "upsampled_size": [H, W], "native_size": input_size,
        "batch_size": batch, "scale_factor": model.scale_factor, "color_fix": color_fix_mode,
        "dtype": str(next(model.unet.parameters()).dtype).replace("torch.", ""),
    }
    if ph or pw:
        params["padding"] = {"mode": pad_mode, "bottom": ph, "right": pw}
    if tile:
        t = max(8, tile - tile % 8)
        params["tiling"] = {"tile": t, "overlap": min(tile_overlap, t - 8), "tile_batch": tile_batch,
                            "weights": weights}
    params["timesteps"] = space_timesteps(1000, [steps])[::-1]
    record_prompts(params, batch, guidance, seeds, prompt=(prompt, None), negative_prompt=(negative_prompt, None))
    return Result(images=images, latents=latents.cpu(), parameters={k: v for k, v in params.items() if v is not None})
