"""x2 latent upscaler pipeline (sdup.pipelines.x2_latent) on the tiny latent_upscaler fixture: the diffusers
pipeline fixtures (10 Euler steps, with / without CFG) reproduced with the sdup K-UNet, and the whole pipeline
against diffusers' ``StableDiffusionLatentUpscalePipeline`` built from the same tiny UNet + text encoder and a tiny
random f=8 VAE (batch 2, latent and image input, decoded and latent outputs), plus the latent contract."""
import dataclasses
import functools
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import sdup
from helpers import FIXTURES, SAMPLER_TOL, assert_parity, assert_within_ulps, randomize_
from sdup.diffusion.schedules import diffusers_alphas_cumprod, discrete_sigmas
from sdup.models.latent_upscaler import KUNet
from sdup.pipelines.conditioning import encode_x2_prompts, padding_mask
from sdup.pipelines.latents_file import read_latents
from sdup.pipelines.x2_latent import upscale_latents_x2, x2_sigmas

pytestmark = [pytest.mark.usefixtures("no_grad"),  # forward-only tests (conftest.py)
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]
LU = FIXTURES / "latent_upscaler"
DIFFUSERS = LU / "diffusers"
h, w = 8, 12          # low-res latent (fixture size); output latent 16x24
STEPS = 6             # whole-pipeline comparisons (the fixtures use 10)


def fixture(name):
    return load_file(LU / f"{name}.safetensors")


@functools.lru_cache(maxsize=None)
def model():
    m = sdup.load(DIFFUSERS)
    m.unet.eval()
    return m


def stacked(d, prefix):
    return [d[k] for k in sorted(k for k in d if k.startswith(prefix + "."))]


# ------------------------------------------------------------------------------------------------
# upstream (diffusers) pipeline fixtures


@pytest.mark.parametrize("name,guidance", [("pipeline_nocfg", 1.0), ("pipeline_cfg9", 9.0)])
def test_pipeline_fixture(name, guidance):
    d = fixture(name)
    sigmas, ts = x2_sigmas(10, "diffusers", model()), discrete_sigmas(diffusers_alphas_cumprod(), 10)[1]
    # made on another CPU, whose torch float32 sqrt (MKL) may round differently: one rounded call apart at most
    assert_within_ulps(sigmas, d["out.sigmas"], 1, name)
    assert torch.equal(ts.float(), d["out.timesteps"])  # integers 999, 888, ..., 0: exact on any machine
    assert float(d["out.init_noise_sigma"]) == float(d["out.sigmas"][0])  # both the fixture's: max() is an element
    neg = {}
    if guidance != 1:
        neg = dict(negative_embeds=d["in.negative_prompt_embeds"],
                   negative_pooled_embeds=d["in.negative_pooled_prompt_embeds"])
    steps = []
    out = upscale_latents_x2(model(), d["in.image_latents"], prompt_embeds=d["in.prompt_embeds"],
                             pooled_prompt_embeds=d["in.pooled_prompt_embeds"], **neg, steps=10, guidance=guidance,
                             x_T=d["in.latents_unscaled"], decode=False, progress=False,
                             callback=lambda s: steps.append(s["x"]))
    assert out.images is None and len(steps) == 10
    errs = [assert_parity(x, ref, SAMPLER_TOL, f"{name} step {i}")
            for i, (x, ref) in enumerate(zip(steps, stacked(d, "out.step_latents")))]
    errs.append(assert_parity(out.latents, d["out.latents"], SAMPLER_TOL, f"{name} latents"))
    assert out.parameters["sigmas"] == [round(float(s), 6) for s in sigmas]
    print(f"x2 {name}: max|Δ| over steps {max(errs[:-1]):.2e}, final {errs[-1]:.2e} "
          f"(max|ref| {d['out.latents'].abs().max():.2f})")


def test_text_features_match_fixture():
    """hidden_states[-1] (before the final LayerNorm) + pooler_output, from token ids."""
    d = load_file(LU / "text_encoder.safetensors")
    ctx, pooled, mask = encode_x2_prompts(model(), d["in.input_ids"])
    assert_parity(ctx, d["out.prompt_embeds"], what="x2 prompt embeds")
    assert_parity(pooled, d["out.pooled"], what="x2 pooled")
    ids = d["in.input_ids"]
    for row, m in zip(ids, mask):
        n = int((row == 255).int().argmax()) + 1  # start .. first end-of-text token
        assert m[:n].eq(1).all() and m[n:].eq(0).all()


def test_sigma_grids():
    orig = x2_sigmas(50, "original")
    assert len(orig) == 51 and orig[-1] > 0
    ref = torch.linspace(math.log(14.614642), math.log(0.0291675), 51, dtype=torch.float64).exp()
    torch.testing.assert_close(orig, ref.float(), rtol=0, atol=0)
    k = x2_sigmas(20, "karras")
    assert len(k) == 21 and k[-1] == 0 and k[0] == pytest.approx(14.614642) and k[-2] == pytest.approx(0.0291675)
    with pytest.raises(ValueError, match="schedule"):
        x2_sigmas(10, "cosine")


# ------------------------------------------------------------------------------------------------
# the whole pipeline against diffusers' StableDiffusionLatentUpscalePipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The fixture's diffusers folder plus a tiny random SD-type VAE (f = 8, 4 latent channels) and a
    model_index.json: a complete sd-x2-latent-upscaler layout."""
    from diffusers import AutoencoderKL
    root = tmp_path_factory.mktemp("x2") / "sd-x2-tiny"
    for comp in ("unet", "text_encoder", "scheduler"):
        shutil.copytree(DIFFUSERS / comp, root / comp)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 32, 32, 32],
                        layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=64)
    randomize_(vae, seed=3, std=0.08)
    vae.save_pretrained(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionLatentUpscalePipeline"}))
    return root


@pytest.fixture(scope="module")
def loaded(folder):
    m = sdup.load(folder)
    assert m.family == "x2" and m.vae is not None and m.scale_factor == 0.18215
    return m


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel
    p = StableDiffusionLatentUpscalePipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae").eval(),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder").eval(), tokenizer=None,
        unet=UNet2DConditionModel.from_pretrained(folder / "unet").eval(),
        scheduler=EulerDiscreteScheduler.from_pretrained(folder / "scheduler"))
    p.set_progress_bar_config(disable=True)
    return p


def text_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(prompt_embeds=r(batch, 77, 32), pooled_prompt_embeds=r(batch, 32),
                negative_prompt_embeds=r(batch, 77, 32), negative_pooled_prompt_embeds=r(batch, 32))


def sdup_text(t):
    return dict(prompt_embeds=t["prompt_embeds"], pooled_prompt_embeds=t["pooled_prompt_embeds"],
                negative_embeds=t["negative_prompt_embeds"], negative_pooled_embeds=t["negative_pooled_prompt_embeds"])


def gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def low_latents(batch=2, seed=1):
    return torch.randn(batch, 4, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("guidance,output_type", [(1.0, "latent"), (9.0, "latent"), (9.0, "pt"), (4.0, "pt")])
def test_against_diffusers_from_latents(loaded, pipe, guidance, output_type):
    t, low = text_inputs(), low_latents()
    ref = pipe(image=low, num_inference_steps=STEPS, guidance_scale=guidance, generator=gens([7, 8]),
               output_type=output_type, **t).images
    out = upscale_latents_x2(loaded, low, **sdup_text(t), steps=STEPS, guidance=guidance, seed=[7, 8],
                             decode=output_type == "pt", progress=False)
    got = out.latents if output_type == "latent" else out.images
    err = assert_parity(got, ref, SAMPLER_TOL, f"x2 vs diffusers g={guidance} {output_type}")
    print(f"x2 vs diffusers, latents in, guidance {guidance}, {output_type}: max|Δ| = {err:.2e}")
    if output_type == "pt":
        assert got.shape == (2, 3, 16 * 8, 24 * 8)


@pytest.mark.parametrize("guidance", [1.0, 9.0])
def test_against_diffusers_from_image(loaded, pipe, guidance):
    """Image path: diffusers encodes with ``latent_dist.sample(generator)``, then draws the start noise from the
    same generators; sdup draws in the same order, so the posterior sample matches too."""
    t = text_inputs(seed=2)
    image = torch.rand(2, 3, h * 8, w * 8, generator=torch.Generator().manual_seed(4))
    ref = pipe(image=image, num_inference_steps=STEPS, guidance_scale=guidance, generator=gens([3, 9]),
               output_type="pt", **t).images
    out = upscale_latents_x2(loaded, image=image, **sdup_text(t), steps=STEPS, guidance=guidance, seed=[3, 9],
                             progress=False)
    err = assert_parity(out.images, ref, SAMPLER_TOL, f"x2 image path g={guidance}")
    print(f"x2 vs diffusers, image in (posterior sample), guidance {guidance}: max|Δ| = {err:.2e}")
    # the mean instead of a sample: equals diffusers given the posterior mean as latents
    from sdup.pipelines.decoding import encode_image
    mean = encode_image(loaded, image, 0.18215, sample=False)
    dmean = pipe.vae.encode(2 * image - 1).latent_dist.mode() * 0.18215
    assert_parity(mean, dmean, what="VAE posterior mean")
    out_m = upscale_latents_x2(loaded, image=image, **sdup_text(t), steps=2, guidance=guidance, seed=[3, 9],
                               sample_posterior=False, decode=False, progress=False)
    ref_m = upscale_latents_x2(loaded, dmean, **sdup_text(t), steps=2, guidance=guidance, seed=[3, 9],
                               decode=False, progress=False)
    assert_parity(out_m.latents, ref_m.latents, SAMPLER_TOL, "mode path")


def test_text_prompt_path_against_diffusers(loaded, pipe):
    """Token-id prompts through sdup's text encoder == diffusers fed hidden_states[-1] / pooler_output of
    transformers' CLIPTextModel for the same ids."""
    ids = load_file(LU / "text_encoder.safetensors")["in.input_ids"]  # (2, 77)
    neg = torch.full_like(ids, 255)
    neg[:, 0] = 254
    hf = lambda x: pipe.text_encoder(x, output_hidden_states=True)  # noqa: E731
    o, n = hf(ids), hf(neg)
    low = low_latents(seed=5)
    ref = pipe(image=low, num_inference_steps=3, guidance_scale=9.0, generator=gens([1, 2]), output_type="latent",
               prompt_embeds=o.hidden_states[-1], pooled_prompt_embeds=o.pooler_output,
               negative_prompt_embeds=n.hidden_states[-1], negative_pooled_prompt_embeds=n.pooler_output).images
    out = upscale_latents_x2(loaded, low, ids, "", steps=3, guidance=9.0, seed=[1, 2], decode=False, progress=False)
    err = assert_parity(out.latents, ref, SAMPLER_TOL, "x2 token-id prompts")
    print(f"x2 vs diffusers, token-id prompts: max|Δ| = {err:.2e}")


def test_lms_against_diffusers(loaded, pipe):
    """K-LMS: diffusers' LMSDiscreteScheduler (prediction "sample") in the same pipeline loop (needs scipy)."""
    pytest.importorskip("scipy")
    from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler
    euler = pipe.scheduler
    pipe.scheduler = LMSDiscreteScheduler.from_config(euler.config)
    try:
        t, low = text_inputs(seed=6), low_latents(seed=6)
        ref = pipe(image=low, num_inference_steps=STEPS, guidance_scale=5.0, generator=gens([1, 2]),
                   output_type="latent", **t).images
    finally:
        pipe.scheduler = euler
    out = upscale_latents_x2(loaded, low, **sdup_text(t), steps=STEPS, guidance=5.0, sampler="lms", seed=[1, 2],
                             decode=False, progress=False)
    err = assert_parity(out.latents, ref, SAMPLER_TOL, "x2 lms vs diffusers")
    print(f"x2 K-LMS vs diffusers LMSDiscreteScheduler: max|Δ| = {err:.2e}")


# ------------------------------------------------------------------------------------------------
# options, reproducibility, contract


def test_reproducible_and_batch_independent():
    m, t, low = model(), text_inputs(), low_latents()
    kw = dict(steps=3, guidance=9.0, decode=False, progress=False)
    a = upscale_latents_x2(m, low, **sdup_text(t), seed=11, **kw)
    b = upscale_latents_x2(m, low, **sdup_text(t), seed=11, **kw)
    assert torch.equal(a.latents, b.latents)
    assert a.parameters["seeds"] == [11, 12]
    one = upscale_latents_x2(m, low[1:], **{k: v[1:] for k, v in sdup_text(t).items()}, seed=12, **kw)
    torch.testing.assert_close(one.latents, a.latents[1:], rtol=0, atol=1e-5)
    c = upscale_latents_x2(m, low, **sdup_text(t), seed=13, **kw)
    assert not torch.allclose(c.latents, a.latents)
    # sample_parameters per image
    assert a.sample_parameters(1)["batch_index"] == 1


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m"])
@pytest.mark.parametrize("schedule", ["diffusers", "original", "karras"])
def test_other_samplers_and_grids(sampler, schedule):
    m, t, low = model(), text_inputs(batch=1), low_latents(batch=1)
    out = upscale_latents_x2(m, low, **{k: v[:1] for k, v in sdup_text(t).items()}, steps=4, sampler=sampler,
                             schedule=schedule, guidance=3.0, seed=1, decode=False, progress=False)
    assert out.latents.shape == (1, 4, 2 * h, 2 * w) and torch.isfinite(out.latents).all()
    assert out.parameters["sampler"] == sampler and out.parameters["schedule"] == schedule
    again = upscale_latents_x2(m, low, **{k: v[:1] for k, v in sdup_text(t).items()}, steps=4, sampler=sampler,
                               schedule=schedule, guidance=3.0, seed=1, decode=False, progress=False)
    assert torch.equal(out.latents, again.latents)


def test_mask_padding():
    m = model()
    ids = load_file(LU / "text_encoder.safetensors")["in.input_ids"]
    low = low_latents()
    kw = dict(steps=2, guidance=9.0, seed=0, decode=False, progress=False)
    plain = upscale_latents_x2(m, low, ids, **kw)
    masked = upscale_latents_x2(m, low, ids, mask_padding=True, **kw)
    assert masked.parameters["mask_padding"] is True
    assert (plain.latents - masked.latents).abs().max() > 1e-4  # the original's mask changes the result
    ctx, pooled, mask = encode_x2_prompts(m, ids)
    nctx, npooled, nmask = encode_x2_prompts(m, [""])
    assert torch.equal(nmask[0, :3], torch.tensor([1.0, 1.0, 0.0]))
    emb = dict(prompt_embeds=ctx, pooled_prompt_embeds=pooled, negative_embeds=nctx, negative_pooled_embeds=npooled)
    again = upscale_latents_x2(m, low, **emb, prompt_mask=mask, negative_mask=nmask, mask_padding=True, **kw)
    assert_parity(again.latents, masked.latents, what="mask from ids vs given mask")
    with pytest.raises(ValueError, match="mask"):
        upscale_latents_x2(m, low, **emb, mask_padding=True, **kw)
    assert torch.equal(padding_mask(m, ids), mask.cpu())


def test_noise_level():
    m = model()
    low, t = low_latents(batch=1), {k: v[:1] for k, v in sdup_text(text_inputs(batch=1)).items()}
    kw = dict(steps=2, guidance=1.0, seed=0, decode=False, progress=False)
    with pytest.raises(ValueError, match="k-diffusion"):
        upscale_latents_x2(m, low, **t, noise_level=0.3, **kw)
    # a K-UNet with the original's noise-level weights: s = 0 is the diffusers result, s > 0 differs
    unet = KUNet(dataclasses.replace(m.unet.cfg, noise_aug_embed=True)).eval()
    missing = unet.load_state_dict(m.unet.state_dict(), strict=False).missing_keys
    assert missing == ["noise_aug_features.weight"]
    kd = dataclasses.replace(m, unet=unet)
    base = upscale_latents_x2(m, low, **t, **kw)
    same = upscale_latents_x2(kd, low, **t, noise_level=0.0, **kw)
    assert_parity(same.latents, base.latents, what="noise level 0 with the Fourier weights")
    for aug in ("gaussian", "fake"):
        out = upscale_latents_x2(kd, low, **t, noise_level=0.5, noise_aug=aug, **kw)
        assert torch.isfinite(out.latents).all() and (out.latents - base.latents).abs().max() > 1e-3
        assert out.parameters["noise_aug"] == aug
    with pytest.raises(ValueError, match="noise_level"):
        upscale_latents_x2(kd, low, **t, noise_level=-1, **kw)


def test_latent_contract_errors(loaded):
    m, t = model(), sdup_text(text_inputs(batch=1))
    kw = dict(steps=1, decode=False, progress=False)
    with pytest.raises(ValueError, match=r"SD 1.x / 2.x latents.*3 channels.*image="):
        upscale_latents_x2(m, torch.rand(1, 3, 64, 96), **t, **kw)
    with pytest.raises(ValueError, match="4 channels.*got 16"):
        upscale_latents_x2(m, torch.randn(1, 16, 8, 12), **t, **kw)
    with pytest.raises(ValueError, match="multiple of 4"):
        upscale_latents_x2(m, torch.randn(1, 4, 7, 12), **t, **kw)
    with pytest.raises(ValueError, match="at least 8x8"):  # the bottom level would be 1 px wide
        upscale_latents_x2(m, torch.randn(1, 4, 4, 8), **t, **kw)
    with pytest.raises(ValueError, match="float tensor"):
        upscale_latents_x2(m, torch.ones(1, 4, 8, 12, dtype=torch.long), **t, **kw)
    with pytest.raises(ValueError, match="exactly one"):
        upscale_latents_x2(m, None, **t, **kw)
    with pytest.raises(ValueError, match="exactly one"):
        upscale_latents_x2(loaded, low_latents(1), image=torch.rand(1, 3, 64, 96), **t, **kw)
    with pytest.raises(ValueError, match="latents="):
        upscale_latents_x2(loaded, image=torch.rand(1, 4, 8, 12), **t, **kw)
    with pytest.raises(ValueError, match="multiples of 32"):  # 8 (VAE) x 4 (latent multiple)
        upscale_latents_x2(loaded, image=torch.rand(1, 3, 60, 96), **t, pad_mode=None, **kw)
    with pytest.raises(ValueError, match="colour fix"):
        upscale_latents_x2(m, low_latents(1), **t, color_fix_mode="bogus", **kw)
    with pytest.raises(ValueError, match="no VAE"):
        upscale_latents_x2(m, low_latents(1), **t, steps=1, progress=False)
    with pytest.raises(ValueError, match="sigma sampler"):
        upscale_latents_x2(m, low_latents(1), **t, sampler="ddim", **kw)
    with pytest.raises(ValueError, match="pooled"):
        upscale_latents_x2(m, low_latents(1), prompt_embeds=t["prompt_embeds"], **kw)
    with pytest.raises(ValueError, match="x_T"):
        upscale_latents_x2(m, low_latents(1), **t, x_T=torch.randn(1, 4, 8, 12), **kw)
    with pytest.raises(ValueError, match="x2-latent-upscaler"):
        upscale_latents_x2(dataclasses.replace(m, family="sd1"), low_latents(1), **t, **kw)
    with pytest.raises(ValueError, match="4-channel SD VAE"):
        from sdup.models.vae import AutoencoderKL, VAEConfig
        upscale_latents_x2(m, low_latents(1), **t, vae=AutoencoderKL(VAEConfig(ch=32, ch_mult=(1,), embed_dim=3,
                                                                               z_channels=3)), **kw)


def test_separate_vae_and_parameters(loaded):
    """The VAE may come separately (an SD checkpoint / VAE LoadedModel or an AutoencoderKL)."""
    m, t, low = model(), sdup_text(text_inputs(batch=1)), low_latents(batch=1)
    a = upscale_latents_x2(loaded, low, **t, steps=2, seed=0, progress=False)
    b = upscale_latents_x2(m, low, **t, steps=2, seed=0, vae=loaded, progress=False)
    c = upscale_latents_x2(m, low, **t, steps=2, seed=0, vae=loaded.vae, progress=False)
    assert torch.equal(a.images, b.images) and torch.equal(a.images, c.images)
    p = a.parameters
    assert (p["pipeline"], p["family"], p["steps"], p["sampler"], p["guidance"]) == ("x2_latent", "x2", 2, "euler", 9.0)
    assert (p["height"], p["width"], p["latent_size"], p["low_res_size"]) == (128, 192, [16, 24], [8, 12])
    json.dumps(p)


def test_read_latents_file(tmp_path):
    """The txt2img --latents-out file format -> latents for the upscaler; other latent spaces are refused."""
    from safetensors.torch import save_file
    low = low_latents(batch=2)
    meta = {"parameters": json.dumps({"pipeline": "txt2img", "seeds": [1, 2]}), "scale_factor": "0.18215"}
    save_file({"latents": low}, str(tmp_path / "lat.safetensors"), metadata=meta)
    lat, m = read_latents(tmp_path / "lat.safetensors")
    assert torch.equal(lat, low) and m["parameters"]["seeds"] == [1, 2]
    out = upscale_latents_x2(model(), lat, [254, 255], steps=1, decode=False, progress=False)
    assert out.latents.shape == (2, 4, 2 * h, 2 * w)
    save_file({"latents": low}, str(tmp_path / "xl.safetensors"), metadata={"scale_factor": "0.13025"})
    with pytest.raises(ValueError, match="0.18215"):
        read_latents(tmp_path / "xl.safetensors")
    save_file({"x": low}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="latents"):
        read_latents(tmp_path / "bad.safetensors")


def test_image_padding_crops_back(loaded):
    """An image whose sides are not multiples of 32 is replicate-padded; the output is exactly 2H x 2W and equals
    the padded image's output cropped (same random numbers)."""
    t = sdup_text(text_inputs(batch=1))
    img = torch.rand(1, 3, 60, 90, generator=torch.Generator().manual_seed(5))
    kw = dict(steps=2, guidance=1.0, seed=3, progress=False)
    out = upscale_latents_x2(loaded, image=img, **t, **kw)
    assert out.images.shape == (1, 3, 120, 180)
    assert out.parameters["padding"] == {"mode": "replicate", "bottom": 4, "right": 6}
    padded = torch.nn.functional.pad(img, (0, 6, 0, 4), mode="replicate")
    ref = upscale_latents_x2(loaded, image=padded, **t, **kw)
    assert ref.images.shape == (1, 3, 128, 192) and "padding" not in ref.parameters
    assert (out.images - ref.images[..., :120, :180]).abs().max() == 0


def test_tiled_equals_untiled_and_tiles_blend(loaded):
    """K-UNet tiles (TiledModel) + tiled VAE decode: one tile covering the 2x latent is the untiled run; smaller
    tiles change the result only a little (random tiny weights: no quality claim) and stay finite."""
    t = sdup_text(text_inputs(batch=2))
    low = low_latents(2)                      # (2, 4, 8, 12) -> 2x latent 16 x 24
    kw = dict(steps=2, guidance=4.0, seed=7, progress=False)
    base = upscale_latents_x2(loaded, low, **t, **kw)
    whole = upscale_latents_x2(loaded, low, **t, tile=24, vae_tile=24, **kw)
    assert (whole.latents - base.latents).abs().max() == 0
    assert (whole.images - base.images).abs().max() < 1e-5
    tiled = upscale_latents_x2(loaded, low, **t, tile=16, tile_overlap=8, vae_tile=8, vae_overlap=2,
                                **kw)  # 1 x 2 latent tiles
    assert tiled.parameters["tiling"] == {"tile": 16, "overlap": 8, "vae_tile": 8, "vae_overlap": 2}
    assert torch.isfinite(tiled.images).all() and tiled.images.shape == base.images.shape
    assert 0 < (tiled.latents - base.latents).abs().max()


@pytest.mark.parametrize("mode", ["adain", "wavelet"])
def test_color_fix(loaded, mode):
    """Colour fix against the input image (image path) or the decoded low-res latents (latents path)."""
    from sdup.pipelines.colorfix import color_fix
    from sdup.pipelines.decoding import decode_latents
    t = sdup_text(text_inputs(batch=1))
    kw = dict(steps=2, guidance=1.0, seed=2, progress=False)
    low = low_latents(1)
    plain = upscale_latents_x2(loaded, low, **t, **kw)
    fixed = upscale_latents_x2(loaded, low, **t, color_fix_mode=mode, **kw)
    assert fixed.parameters["color_fix"] == mode
    raw = decode_latents(loaded, plain.latents, clamp=False)
    ref = decode_latents(loaded, low, clamp=False)
    want = ((color_fix(raw, ref, mode) + 1) / 2).clamp(0, 1)
    assert (fixed.images - want).abs().max() < 1e-6
