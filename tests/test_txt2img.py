"""SD text-to-image: the whole pipeline vs diffusers' StableDiffusionPipeline on the tiny sd1 fixture (exported
to a diffusers folder), reproducibility from seeds, the PNG / image helpers and scripts/txt2img.py."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import sdup
from helpers import FIXTURES, SAMPLER_TOL, assert_parity
from sdup.checkpoints.export import save_diffusers
from sdup import images
from sdup.images import pngfile
from sdup.diffusion.grids import discrete_timesteps
from sdup.diffusion.samplers import get_sampler
from sdup.pipelines import conditioning
from sdup.pipelines.seeds import sample_seeds
from sdup.pipelines.txt2img import Result, txt2img

pytestmark = [pytest.mark.usefixtures("no_grad"),  # forward-only tests (conftest.py)
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]
ROOT = Path(__file__).resolve().parents[1]
CKPT, YAML = FIXTURES / "sd1" / "model.ckpt", FIXTURES / "sd1" / "config.yaml"
H, W = 48, 64                          # latent 6 x 8: the tiny UNet downsamples once (needs multiples of 2)
PROMPT_IDS = [[254, 10, 20, 30, 255], [254, 77, 255]]   # tiny vocabulary (256): 254 / 255 = start / end
SD1_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                     steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)


@pytest.fixture(scope="module")
def model():
    return sdup.load(CKPT, config=YAML)


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1") / "diffusers"
    save_diffusers(model, path)
    return path


def diffusers_pipe(folder, scheduler, prediction="epsilon"):
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel
    cls = getattr(diffusers, scheduler)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae"), text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=None, unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=cls.from_config({**SD1_SCHEDULER, "prediction_type": prediction}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(model, ids):
    return conditioning.encode_prompts(model, ids)


def test_text_encoder_matches_transformers(model, folder):
    from transformers import CLIPTextModel
    ref = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    ids = conditioning.token_ids(model, PROMPT_IDS + [""])
    assert ids.shape == (3, 77) and ids[2, :3].tolist() == [254, 255, 255]  # "" = [bos, eos, pad...] everywhere
    err = assert_parity(embeddings(model, ids), ref(ids).last_hidden_state, what="text encoder")
    print(f"text encoder vs transformers: max|Δ| = {err:.2e}")


CASES = [("ddim", "DDIMScheduler", {}), ("plms", "PNDMScheduler", {}), ("euler", "EulerDiscreteScheduler", {}),
         ("dpmpp_2m", "DPMSolverMultistepScheduler", {}), ("lms", "LMSDiscreteScheduler", {}),
         ("euler_a", "EulerAncestralDiscreteScheduler", {}), ("ddim", "DDIMScheduler", dict(eta=0.5)),
         ("ddpm", "DDPMScheduler", {})]


@pytest.fixture
def scipy_free_lms(monkeypatch):
    """diffusers' LMS integrates its coefficients with scipy (not installed): an independent composite Simpson
    rule stands in (exact for the cubic integrands)."""
    import diffusers
    import diffusers.schedulers.scheduling_lms_discrete as lms

    class Integrate:
        @staticmethod
        def quad(fn, a, b, epsrel=None):
            n, h = 64, (float(b) - float(a)) / 64
            vals = [float(fn(float(a) + k * h)) for k in range(n + 1)]
            return h / 3 * (vals[0] + vals[-1] + 4 * sum(vals[1:-1:2]) + 2 * sum(vals[2:-1:2])), 0.0

    monkeypatch.setattr(lms, "integrate", Integrate, raising=False)
    monkeypatch.setattr(diffusers, "LMSDiscreteScheduler", lms.LMSDiscreteScheduler)  # the top-level one is a dummy


@pytest.mark.parametrize("sampler,scheduler,opts", CASES, ids=[f"{c[0]}{c[2] or ''}" for c in CASES])
def test_pipeline_matches_diffusers(model, folder, sampler, scheduler, opts, scipy_free_lms):
    """Batch 2, 48x64, guidance 7.5, 10 steps. Deterministic samplers get the same fixed latents; the stochastic
    runs (Euler a, DDIM eta 0.5, DDPM) get one generator per sample in both, which then also drives the step noise."""
    cond, uncond = embeddings(model, PROMPT_IDS), embeddings(model, ["", ""])
    stochastic = sampler in ("euler_a", "ddpm") or opts.get("eta")
    latents = None if stochastic else torch.randn(2, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (100, 101)]  # noqa: E731
    pipe = diffusers_pipe(folder, scheduler)
    final = {}
    keep = lambda p, i, t, kw: final.update(kw) or kw  # noqa: E731  (the latents after the last step)
    ref = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=H, width=W, num_inference_steps=10,
               guidance_scale=7.5, latents=latents, generator=gens(), output_type="pt", callback_on_step_end=keep,
               **opts).images
    out = txt2img(model, prompt_embeds=cond, negative_embeds=uncond, height=H, width=W, steps=10, sampler=sampler,
                  guidance=7.5, x_T=latents, seed=[100, 101], progress=False, **opts)
    assert out.images.shape == (2, 3, H, W) and out.latents.shape == (2, 4, H // 8, W // 8)
    assert 0.05 < ((ref > 0) & (ref < 1)).float().mean()  # not all clamped: the comparison means something
    assert_parity(out.latents, final["latents"], SAMPLER_TOL, f"{sampler} latents vs {scheduler}")
    err = assert_parity(out.images, ref, SAMPLER_TOL, f"{sampler} vs {scheduler}")
    print(f"{sampler} {opts or ''} vs {scheduler}: max|Δ| = {err:.2e} (images in [0, 1])")
    # the same run from token ids (the pipeline encodes the prompt and "" itself)
    again = txt2img(model, PROMPT_IDS, height=H, width=W, steps=10, sampler=sampler, x_T=latents,
                    seed=[100, 101], progress=False, **opts)
    assert_parity(again.images, out.images, what="token ids vs embeddings")


@pytest.mark.parametrize("sampler,scheduler", [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler"),
                                               ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_v_prediction_matches_diffusers(folder, sampler, scheduler):
    """The v path (SD 2.x 768-v): the same tiny weights read as a v model on both sides."""
    model = sdup.load(CKPT, config=YAML, prediction="v")
    assert model.prediction == "v"
    cond, uncond = embeddings(model, PROMPT_IDS), embeddings(model, ["", ""])
    latents = torch.randn(2, 4, H // 8, W // 8, generator=torch.Generator().manual_seed(4))
    pipe = diffusers_pipe(folder, scheduler, prediction="v_prediction")
    ref = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=H, width=W, num_inference_steps=8,
               guidance_scale=5.0, latents=latents, output_type="pt").images
    out = txt2img(model, prompt_embeds=cond, negative_embeds=uncond, height=H, width=W, steps=8, sampler=sampler,
                  guidance=5.0, x_T=latents, progress=False)
    err = assert_parity(out.images, ref, SAMPLER_TOL, f"v {sampler} vs {scheduler}")
    print(f"v-prediction {sampler} vs {scheduler}: max|Δ| = {err:.2e} (images in [0, 1])")
    eps = txt2img(sdup.load(CKPT, config=YAML), prompt_embeds=cond, negative_embeds=uncond, height=H, width=W, steps=8,
                  sampler=sampler, guidance=5.0, x_T=latents, progress=False)
    assert (eps.images - out.images).abs().max() > 1e-3  # the parameterisation matters


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "ddpm"])
def test_seeds_reproduce_per_sample(model, sampler):
    kw = dict(height=H, width=W, steps=4, sampler=sampler, progress=False)
    if sampler == "ddim":
        kw["eta"] = 1.0
    three = txt2img(model, [254, 5, 255], batch_size=3, seed=10, **kw)
    one = txt2img(model, [254, 5, 255], batch_size=1, seed=11, **kw)
    assert three.parameters["seeds"] == [10, 11, 12] and one.parameters["seeds"] == [11]
    assert_parity(one.images[0], three.images[1], what=f"{sampler}: sample of seed 11, batch 1 vs 3")
    assert_parity(one.latents[0], three.latents[1], what=f"{sampler}: latents batch 1 vs 3")
    assert not torch.allclose(three.images[0], three.images[1])
    twice = txt2img(model, [254, 5, 255], batch_size=3, seed=10, **kw)
    assert torch.equal(twice.images, three.images) and torch.equal(twice.latents, three.latents)
    assert three.sample_parameters(2)["seed"] == 12


def test_guidance_one_skips_the_negative_prompt(model):
    calls = []
    unet = model.unet
    hook = unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        out = txt2img(model, [254, 5, 255], "this text is never encoded", height=H, width=W, steps=2, guidance=1.0,
                      batch_size=2, progress=False)
    finally:
        hook.remove()
    assert calls == [2, 2] and "negative_prompt" not in out.parameters
    calls.clear()
    hook = unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        txt2img(model, [254, 5, 255], height=H, width=W, steps=2, batch_size=2, progress=False)
    finally:
        hook.remove()
    assert calls == [4, 4]  # [uncond, cond] in one call per step


def test_callback_and_parameters(model):
    seen = []
    out = txt2img(model, [254, 5, 255], height=H, width=W, steps=5, sampler="dpmpp_2m", callback=seen.append,
                  seed=7, progress=False)
    assert isinstance(out, Result) and [s["i"] for s in seen] == list(range(5))
    p = out.parameters
    assert (p["sampler"], p["steps"], p["seeds"], p["height"], p["width"], p["family"]) == ("dpmpp_2m", 5, [7], H, W, "sd1")
    assert len(p["sigmas"]) == 6 and p["sigmas"][-1] == 0
    assert p["prompt"] == {"token_ids": [254, 5, 255]}
    json.dumps(p)
    ddim = txt2img(model, [254, 5, 255], height=H, width=W, steps=10, progress=False)
    assert ddim.parameters["timesteps"] == list(range(901, 0, -100))


@pytest.mark.parametrize("kw,msg", [
    (dict(height=50), "multiples of 8"), (dict(width=40), "multiples of 16"), (dict(sampler="heun"), "unknown sampler"),
    (dict(steps=0), "steps"), (dict(steps=1001), "steps"), (dict(sampler="plms", eta=0.5), "eta applies"),
    (dict(eta=-1.0), "eta"), (dict(guidance=float("nan")), "guidance"), (dict(batch_size=0), "batch_size"),
    (dict(seed=[1, 2]), "2 seeds for a batch of 1"), (dict(x_T=torch.zeros(1, 4, 2, 2)), "x_T must have shape"),
    (dict(prompt="a cat"), "no BPE tokenizer"), (dict(prompt=[254, 300, 255]), "token ids must be in"),
    (dict(prompt=None), "give a prompt"), (dict(prompt_embeds=torch.zeros(77, 16)), "the UNet expects 32"),
])
def test_invalid_inputs_raise_value_errors(model, kw, msg):
    args = dict(prompt=[254, 5, 255], height=H, width=W, steps=2, progress=False)
    args.update(kw)
    if "prompt_embeds" in kw:
        args.pop("prompt")
    with pytest.raises(ValueError, match=msg):
        txt2img(model, **args)


def test_sd2_style_text_encoder_and_v(model):
    """SD 2.x path: OpenCLIP-style encoder (penultimate block + ln_final, zero padding) and v prediction
    (the tiny x4 text tower on the tiny sd1 UNet/VAE: same widths)."""
    x4 = sdup.load(FIXTURES / "x4" / "model.ckpt", config=FIXTURES / "x4" / "config.yaml")
    sd2 = sdup.LoadedModel(family="sd2", source="tiny sd2", unet=model.unet, vae=model.vae, text_encoder=x4.text_encoder,
                           prediction="v", scale_factor=model.scale_factor, schedule=model.schedule)
    ids = conditioning.token_ids(sd2, [""])
    assert ids[0, :3].tolist() == [254, 255, 0]  # open_clip pads with 0
    out = txt2img(sd2, [254, 9, 255], height=H, width=W, steps=3, sampler="euler", progress=False)
    assert out.images.shape == (1, 3, H, W) and torch.isfinite(out.images).all()
    assert out.parameters["prediction"] == "v" and out.parameters["family"] == "sd2"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_unet_keeps_vae_fp32(dtype):
    m = sdup.load(CKPT, config=YAML, dtype=dtype)
    assert next(m.vae.parameters()).dtype == torch.float32
    out = txt2img(m, [254, 5, 255], height=H, width=W, steps=3, progress=False)
    ref = txt2img(sdup.load(CKPT, config=YAML), [254, 5, 255], height=H, width=W, steps=3, progress=False)
    assert out.latents.dtype == torch.float32 and out.parameters["dtype"] == str(dtype).split(".")[1]
    assert (out.images - ref.images).abs().max() < 0.05


def test_rejects_non_text_to_image_models():
    x4 = sdup.load(FIXTURES / "x4" / "model.ckpt", config=FIXTURES / "x4" / "config.yaml")
    with pytest.raises(ValueError, match="Stable Diffusion 1.x / 2.x"):
        txt2img(x4, [254, 255])


# ------------------------------------------------------------------------------------------------ helpers


def test_png_parameters_and_16_bit_round_trip(tmp_path):
    img = torch.rand(3, 9, 13, generator=torch.Generator().manual_seed(0))
    params = {"prompt": "un chat sur la lune \u2603", "seed": 3}
    p8 = images.save_png(img, tmp_path / "a.png", params)
    assert images.read_png_parameters(p8) == params
    assert (images.load_image(p8) - img).abs().max() <= 0.5 / 255 + 1e-6
    p16 = images.save_png(img, tmp_path / "b.png", params, bits=16)
    assert images.read_png_parameters(p16) == params
    assert (images.load_image(p16) - img).abs().max() <= 0.5 / 65535 + 1e-7
    from PIL import Image
    with Image.open(p16) as im:  # a valid PNG for Pillow too (which reads it as 8-bit RGB)
        assert im.size == (13, 9)
    assert not list(tmp_path.glob(".*partial"))


def test_png_filter_decoding_matches_pillow(tmp_path):
    """Our PNG unfiltering (used for 16-bit files) on Pillow-written files, which use all five filters."""
    from PIL import Image
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:37, 0:41]
    rgb = np.stack([(xx * 6) % 256, (yy * 7) % 256, g.integers(0, 256, (37, 41))], -1).astype(np.uint8)
    rgb[10:20] = g.integers(0, 256, (10, 41, 3))
    Image.fromarray(rgb).save(tmp_path / "rgb.png", optimize=True)
    assert np.array_equal(pngfile._read_png(tmp_path / "rgb.png"), rgb)
    grey = ((xx * 1500 + yy * 700) % 65536).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert np.array_equal(pngfile._read_png(tmp_path / "g16.png")[:, :, 0], grey)
    t = images.load_image(tmp_path / "g16.png")
    assert t.shape == (3, 37, 41) and torch.allclose(t[1], torch.from_numpy(grey / 65535.0).float())


def test_pil_conversions(tmp_path):
    from PIL import Image
    x = torch.rand(3, 5, 6)
    pil = images.tensor_to_pil(x)
    assert pil.mode == "RGB" and (images.pil_to_tensor(pil) - x).abs().max() <= 0.5 / 255 + 1e-6
    g16 = images.tensor_to_pil(x[:1], bits=16)
    assert g16.mode == "I;16" and (images.pil_to_tensor(g16)[0] - x[0]).abs().max() <= 0.5 / 65535 + 1e-7
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 40))
    assert images.pil_to_tensor(rgba).shape == (3, 3, 4) and images.pil_to_tensor(rgba, alpha=True).shape == (4, 3, 4)
    with pytest.raises(ValueError, match="16-bit RGB"):
        images.tensor_to_pil(x, bits=16)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable"):
        images.load_image(tmp_path / "junk.png")


def test_output_paths_and_samplers(tmp_path):
    assert images.output_paths(tmp_path / "x.png", 1) == [tmp_path / "x.png"]
    assert images.output_paths(tmp_path / "x.png", 2) == [tmp_path / "x-0.png", tmp_path / "x-1.png"]
    (tmp_path / "s-42.png").write_bytes(b"")
    assert images.output_paths(tmp_path, 2, names=["s-42", "s-43"]) == [tmp_path / "s-42-1.png", tmp_path / "s-43.png"]
    assert get_sampler("DPM++ 2M").name == "dpmpp_2m" and get_sampler("pndm").name == "plms"
    assert get_sampler("k_euler_a").name == "euler_a"
    assert sample_seeds(5, 3) == [5, 6, 7] and len(sample_seeds(None, 2)) == 2
    assert discrete_timesteps(50).tolist()[:3] == [981, 961, 941]
    assert discrete_timesteps(3).tolist() == [667, 334, 1]  # diffusers "leading"; CompVis fails here
    assert discrete_timesteps(999)[0] == 999 and discrete_timesteps(501)[0] == 501  # one step per t
    with pytest.raises(ValueError, match=r"steps must be in 1\.\.999"):
        discrete_timesteps(1000)  # would end at t = 1000, past the schedule


# ------------------------------------------------------------------------------------------------ script


def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "txt2img.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_script_writes_pngs_and_latents(tmp_path):
    out, lat = tmp_path / "img.png", tmp_path / "lat.safetensors"
    r = run_script("--weights", CKPT, "--config", YAML, "--prompt-ids", "254,10,20,255", "--height", H, "--width", W,
                   "--steps", 3, "--batch", 2, "--seed", 5, "--out", out, "--latents-out", lat,
                   "--quiet")
    assert r.returncode == 0, r.stderr
    files = sorted(tmp_path.glob("*.png"))
    assert [f.name for f in files] == ["img-0.png", "img-1.png"]
    p = images.read_png_parameters(files[1])
    assert (p["seed"], p["steps"], p["sampler"], p["guidance"]) == (6, 3, "ddim", 7.5)
    assert p["prompt"] == {"token_ids": [254, 10, 20, 255]} and p["batch_index"] == 1
    assert p["timesteps"] == [667, 334, 1]  # 3 DDIM steps: diffusers' "leading" grid (CompVis cannot run 3)
    with safe_open(lat, "pt") as f:
        assert f.get_tensor("latents").shape == (2, 4, H // 8, W // 8)
        meta = f.metadata()
    assert json.loads(meta["seeds"]) == [5, 6] and float(meta["scale_factor"]) == 0.18215
    assert json.loads(meta["prompt"]) == {"token_ids": [254, 10, 20, 255]}
    # the image is the one the library makes
    m = sdup.load(CKPT, config=YAML)
    ref = txt2img(m, [254, 10, 20, 255], height=H, width=W, steps=3, seed=[6], progress=False)
    assert (images.load_image(files[1]) - ref.images[0]).abs().max() <= 0.5 / 255 + 1e-5
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("args,msg", [
    (["--weights", "missing/sd-v1-4.ckpt"], "weights/README.md"),
    (["--height", "50"], "multiple of 8"),
    (["--prompt", "a cat"], "no BPE tokenizer"),
    (["--sampler", "heun"], "invalid choice"),
    (["--latents-out", "lat.pt"], ".safetensors"),
    (["--sampler", "plms", "--eta", "0.5"], "eta applies"),
    (["--width", "40"], "multiples of 16"),
])
def test_script_errors(tmp_path, args, msg):
    base = {"--weights": str(CKPT), "--config": str(YAML), "--prompt-ids": "254,10,255", "--height": str(H),
            "--width": str(W), "--steps": "2", "--out": str(tmp_path / "o.png")}
    for k, v in zip(args[::2], args[1::2]):
        if k == "--prompt":
            base.pop("--prompt-ids")
        base[k] = str(tmp_path / v) if k == "--latents-out" else v
    r = run_script(*[x for kv in base.items() for x in kv], "--quiet")
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and msg in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not list(tmp_path.iterdir())
