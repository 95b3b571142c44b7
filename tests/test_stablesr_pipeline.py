"""StableSR pipeline (sdup.pipelines.stablesr) on the tiny upstream fixtures: the pipeline's denoiser reproduces the
upstream samplers (respaced DDPM with supplied noise, DDIM negative-prompt CFG with its timestep quirk), tiling
(one tile == untiled, several tiles blended, upstream weights), CFW fidelity weight, sizes, seeds, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sdup
from helpers import FIXTURES, assert_parity
from sdup.diffusion import samplers as S
from sdup.pipelines.stablesr import stablesr_denoiser, upscale_stablesr
from sdup.tiling import gaussian_weights

D = FIXTURES / "stablesr"
FAST = dict(steps=2, input_size=32, progress=False)


@pytest.fixture(scope="module")
def model():
    return sdup.load(D / "model.ckpt", config=D / "config.yaml")


@pytest.fixture(scope="module")
def cfw():
    return sdup.load(D / "cfw_vae.ckpt", config=D / "cfw_vae_config.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: single-threaded (conftest.py)


def image(b=2, h=12, w=20, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def stacked(d, prefix):
    return [d[k] for k in sorted(k for k in d if k.startswith(prefix + "."))]


@pytest.mark.parametrize("name,sampler,guidance", [("sampler_ddpm_respaced10", "ddpm", 1.0),
                                                   ("sampler_ddim_negprompt_cfg", "ddim", 5.5)])
def test_pipeline_denoiser_reproduces_upstream_sampler(model, name, sampler, guidance):
    """``stablesr_denoiser`` (what upscale_stablesr samples with) + the sdup sampler == upstream, every step."""
    d = load_file(str(D / f"{name}.safetensors"))
    den, ddim_ts = stablesr_denoiser(model, guidance, sampler, 10)
    cond = dict(context=d["in.cond"], lr=d["in.struct_cond_latent"])
    uncond = dict(context=d["in.uncond"]) if guidance != 1 else None
    xs = []
    kw = dict(extra_args=dict(cond=cond, uncond=uncond), callback=lambda st: xs.append(st["x"].clone()), disable=True)
    if sampler == "ddpm":
        out = S.sample_ddpm(den, d["in.x_T"], None, noise=stacked(d, "in.noise"), **kw)
    else:
        out = S.sample_ddim(den, d["in.x_T"], ddim_ts, **kw)
    tol = 1e-4 * max(1.0, d["out.samples"].abs().max().item())
    assert (out - d["out.samples"]).abs().max().item() <= tol
    for k, ref in enumerate(stacked(d, "out.x_inter")):
        assert (xs[k] - ref).abs().max().item() <= tol, k


@pytest.mark.parametrize("dec_w", [0.5, 0.0])
def test_vae_tiles_decode_like_the_whole_latent(model, cfw, dec_w):
    """vae_tile: the CFW decoder on latent tiles (encoder features cut to each tile; dec_w 0: no fusion) gives the
    untiled images up to float rounding; the same latents; recorded in the parameters."""
    kw = dict(FAST, sampler="ddim", steps=2, guidance=1.0, seed=5, dec_w=dec_w, color_fix_mode="none")
    whole = upscale_stablesr(model, cfw, image(), **kw)
    tiled = upscale_stablesr(model, cfw, image(), vae_tile=6, vae_overlap=2, **kw)  # several VAE tiles
    assert torch.equal(whole.latents, tiled.latents)
    assert_parity(tiled.images, whole.images)
    assert tiled.parameters["tiling"] == {"tile": None, "overlap": None, "vae_tile": 6, "vae_overlap": 2}
    with pytest.raises(ValueError, match="vae_tile must be an integer"):
        upscale_stablesr(model, cfw, image(), vae_tile=0, **kw)
    with pytest.raises(ValueError, match=r"vae_overlap \(8\) must be smaller than vae_tile \(6\)"):
        upscale_stablesr(model, cfw, image(), vae_tile=6, **kw)


def test_one_tile_equals_untiled_and_tiles_blend(model, cfw):
    kw = dict(FAST, sampler="ddim", steps=4, guidance=3.0, negative_prompt=[3, 4, 5], seed=5)
    base = upscale_stablesr(model, cfw, image(), **kw)
    whole = upscale_stablesr(model, cfw, image(), tile=64, **kw)           # latent 16 x 24: one tile
    assert torch.equal(whole.latents, base.latents) and torch.equal(whole.images, base.images)
    calls = []
    unet = model.unet
    orig = unet.forward
    unet.forward = lambda x, *a, **k: (calls.append(tuple(x.shape)), orig(x, *a, **k))[1]
    try:
        tiled = upscale_stablesr(model, cfw, image(), tile=16, tile_overlap=8, **kw)  # 1 x 2 tiles of 16 x 16
    finally:
        del unet.forward
    assert len(calls) == 4 * 2 and all(c[-2:] == (16, 16) for c in calls)
    assert tiled.parameters["tiling"] == {"tile": 16, "overlap": 8, "vae_tile": None, "vae_overlap": None,
                                          "tile_batch": 1, "weights": "symmetric"}
    assert torch.isfinite(tiled.images).all() and tiled.images.shape == base.images.shape
    assert (tiled.latents - base.latents).abs().max() > 0
    # upstream's off-centre weights differ from the symmetric ones only where tiles overlap along y (the x / y
    # factors cancel in the normalisation otherwise): a 24 x 24 latent gives 2 x 2 tiles
    sym = upscale_stablesr(model, cfw, image(1, 20, 20), tile=16, tile_overlap=8, **kw)
    ref = upscale_stablesr(model, cfw, image(1, 20, 20), tile=16, tile_overlap=8, weights="reference", tile_batch=3, **kw)
    assert sym.latents.shape[-2:] == (24, 24)
    assert torch.isfinite(ref.images).all() and (ref.latents - sym.latents).abs().max() > 0


def test_reference_weights_match_upstream_formula():
    """StableSR ``_gaussian_weights``: exp(-(u - m)^2 / (T^2 2 var)) / sqrt(2 pi var), var 0.01, m_x = (T-1)/2 but
    m_y = T/2 (off-centre, as written upstream), numpy float64."""
    for th, tw in [(64, 64), (16, 24), (96, 40)]:
        var = 0.01
        gx = [math.exp(-(x - (tw - 1) / 2) ** 2 / (tw * tw) / (2 * var)) / math.sqrt(2 * math.pi * var) for x in range(tw)]
        gy = [math.exp(-(y - th / 2) ** 2 / (th * th) / (2 * var)) / math.sqrt(2 * math.pi * var) for y in range(th)]
        want = torch.tensor(np.outer(gy, gx))
        got = gaussian_weights(th, tw, "reference")
        assert torch.allclose(got.double(), want, rtol=1e-12, atol=0), (th, tw)


def test_dec_w_and_decoders(model, cfw):
    kw = dict(FAST, seed=3)
    w0 = upscale_stablesr(model, cfw, image(1), dec_w=0.0, **kw)
    w1 = upscale_stablesr(model, cfw, image(1), dec_w=1.0, **kw)
    assert torch.equal(w0.latents, w1.latents) and (w0.images - w1.images).abs().max() > 1e-3
    assert w1.parameters["dec_w"] == 1.0 and w1.parameters["cfw_vae"].endswith("cfw_vae.ckpt")
    # the CFW decode with the features is what the pipeline does (before colour fix / clamp)
    plain = upscale_stablesr(model, None, image(1), **kw)                   # the model's own VAE, no fusion
    assert "dec_w" not in plain.parameters and torch.isfinite(plain.images).all()


def test_sizes_batch_seed(model, cfw):
    out = upscale_stablesr(model, cfw, image(2, 12, 20), **FAST)
    assert out.images.shape == (2, 3, 48, 80) and out.latents.shape[0] == 2
    again = upscale_stablesr(model, cfw, image(2, 12, 20), **FAST)
    assert torch.equal(out.images, again.images)
    one = upscale_stablesr(model, cfw, image(2, 12, 20)[1:], **dict(FAST, seed=43))  # sample 1 has seed 42 + 1
    assert_parity(one.images, out.images[1:], what="batch independence")
    odd = upscale_stablesr(model, cfw, image(1, 9, 14), scale=2.5, **dict(FAST, input_size=16))
    assert odd.images.shape == (1, 3, 22, 35)                             # round(2.5 h) x round(2.5 w)
    small = upscale_stablesr(model, cfw, image(1, 8, 10), scale=2, **FAST)  # s = 32 / 8 > 2: upsampled, resized down
    assert small.images.shape == (1, 3, 16, 20) and small.parameters["upsampled_size"] == [32, 40]
    noise = upscale_stablesr(model, cfw, image(1), start="noise", **FAST)
    assert noise.parameters["start"] == "noise" and torch.isfinite(noise.images).all()


@pytest.mark.parametrize("kw,msg", [
    (dict(dec_w=1.5), "dec_w"), (dict(scale=0.5), "scale"), (dict(sampler="euler"), "ddpm or ddim"),
    (dict(start="x"), "start"), (dict(color_fix_mode="x"), "colour fix"), (dict(steps=0), "steps"),
    (dict(sampler="ddim", steps=3), "grid"),
])
def test_errors(model, cfw, kw, msg):
    with pytest.raises(ValueError, match=msg):
        upscale_stablesr(model, cfw, image(1), **{**FAST, **kw})


def test_wrong_models(model, cfw):
    x4 = sdup.load(FIXTURES / "x4" / "model.ckpt", config=FIXTURES / "x4" / "config.yaml")
    with pytest.raises(ValueError, match="StableSR checkpoint"):
        upscale_stablesr(x4, cfw, image(1), **FAST)
    with pytest.raises(ValueError, match="CFW autoencoder"):
        upscale_stablesr(model, x4, image(1), **FAST)
    with pytest.raises(ValueError, match="at least 8x8"):
        upscale_stablesr(model, cfw, image(1, 4, 6), **FAST)
    with pytest.raises(ValueError, match="RGB"):
        upscale_stablesr(model, cfw, torch.rand(1, 4, 12, 12), **FAST)
