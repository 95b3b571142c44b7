"""x4 upscaler pipeline (sdup.pipelines.x4) and colour fix (sdup.pipelines.colorfix) on the tiny x4 fixture:
upstream noise-augmentation / conditioning fixtures, and the whole pipeline against diffusers'
``StableDiffusionUpscalePipeline`` built from the same weights (batch 2, non-square 16x24 low-res, 10 DDIM steps)."""
import dataclasses
import functools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import sdup
from helpers import FIXTURES, SAMPLER_TOL, assert_parity
from sdup.pipelines import colorfix as CF
from sdup.pipelines.conditioning import encode_prompts
from sdup.pipelines.x4 import (decode, low_res_buffers, noise_augment, unet_input, unet_multiple, upscale_x4,
                               x4_network)

pytestmark = [pytest.mark.usefixtures("no_grad"),  # forward-only tests (conftest.py)
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]
X4 = FIXTURES / "x4"
H, W = 16, 24


@functools.lru_cache(maxsize=None)
def model(dtype=torch.float32):
    return sdup.load(X4 / "model.ckpt", config=X4 / "config.yaml", dtype=dtype)


def fixture(name):
    return load_file(X4 / f"{name}.safetensors")


def token_ids():
    return fixture("text_encoder")["in.input_ids"]  # (2, 77), 254/255 = start/end of the tiny vocabulary


def low_res(seed=0, shape=(2, 3, H, W)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def gens(seed, n=2):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


# ------------------------------------------------------------------------------------------------
# upstream fixtures


def test_noise_augmentation_matches_upstream():
    d = fixture("noise_augmentation")
    s = model().schedule
    assert (s["max_noise_level"], s["noise_linear_start"], s["noise_linear_end"]) == (350, 0.0001, 0.02)
    buf = low_res_buffers(s)
    torch.testing.assert_close(buf["sqrt_alphas_cumprod"], d["out.sqrt_alphas_cumprod"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(buf["sqrt_one_minus_alphas_cumprod"], d["out.sqrt_one_minus_alphas_cumprod"],
                               rtol=1e-6, atol=1e-7)
    assert_parity(noise_augment(d["in.x_low"], d["in.noise_level"], d["in.noise"], s), d["out.x_aug"],
                  what="x4 noise augmentation")
    # values of the official x4 noise schedule
    assert float(buf["sqrt_alphas_cumprod"][20]) == pytest.approx(0.99865, abs=1e-5)
    assert float(buf["sqrt_one_minus_alphas_cumprod"][350]) == pytest.approx(0.59960, abs=1e-5)


def test_conditioning_concat_order_matches_upstream():
    d = fixture("conditioning")
    x7 = unet_input(d["in.x"], d["in.x_aug"])
    assert torch.equal(x7, d["out.unet_input"])  # latent first, then the low-res image
    net = x4_network(model().unet)
    out = net(d["in.x"], d["in.timesteps"], d["in.context"], d["in.x_aug"], d["in.noise_level"])
    assert_parity(out, d["out.model_output"], what="x4 hybrid-adm conditioning")


# ------------------------------------------------------------------------------------------------
# the whole pipeline vs diffusers


def _diffusers_vae(m):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    cfg = m.vae.cfg
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * len(cfg.ch_mult),
                        up_block_types=["UpDecoderBlock2D"] * len(cfg.ch_mult),
                        block_out_channels=[cfg.ch * k for k in cfg.ch_mult], layers_per_block=cfg.num_res_blocks,
                        latent_channels=cfg.embed_dim, norm_num_groups=32, scaling_factor=0.08333)
    sd = torch.load(X4 / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, vae.config), strict=True)  # diffusers' own converter
    return vae.eval()


@functools.lru_cache(maxsize=None)
def diffusers_pipe(source="fixture"):
    """diffusers' pipeline on the fixture weights: UNet converted by diffusers' converter (fixture folder) and VAE
    by diffusers' ``convert_ldm_vae_checkpoint``; or (``"export"``) both read from sdup's ``save_diffusers`` folder."""
    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline,
                           UNet2DConditionModel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source == "fixture":
            unet = UNet2DConditionModel.from_pretrained(X4 / "diffusers" / "unet")
            vae = _diffusers_vae(model())
        else:
            import tempfile
            from sdup.checkpoints.export import save_diffusers
            folder = tempfile.mkdtemp() + "/x4"
            save_diffusers(model(), folder)
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
        sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                              prediction_type="v_prediction", steps_offset=1, set_alpha_to_one=False, clip_sample=False)
        low = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear")
        pipe = StableDiffusionUpscalePipeline(vae=vae.eval(), text_encoder=None, tokenizer=None, unet=unet.eval(),
                                              low_res_scheduler=low, scheduler=sched, max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers(pipe, image, guidance, generator, output_type="pt", latents=None, noise_level=20):
    m = model()
    cond = encode_prompts(m, token_ids())
    uncond = encode_prompts(m, ["", ""])
    steps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(image=image, prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=10,
                   guidance_scale=guidance, noise_level=noise_level, generator=generator, latents=latents,
                   output_type=output_type, callback=lambda i, t, lat: steps.append(lat.clone()), callback_steps=1)
    images = out.images
    if output_type == "np":
        images = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)
    return images, steps


def check_steps(ours, ref, what):
    assert len(ours) == len(ref) == 10
    return max(assert_parity(a, b, SAMPLER_TOL, f"{what} latents after step {i}")
               for i, (a, b) in enumerate(zip(ours, ref)))


@pytest.mark.parametrize("guidance", [1.0, 9.0])
def test_pipeline_matches_diffusers_from_seeds(guidance):
    """Same per-sample generators: augmentation noise and start latents drawn in diffusers' order."""
    img = low_res(1)
    ref, ref_steps = run_diffusers(diffusers_pipe(), img, guidance, gens(5))
    ours_steps = []
    r = upscale_x4(model(), img, token_ids(), steps=10, guidance=guidance, seed=5, progress=False,
                   callback=lambda s: ours_steps.append(s["x"]))
    assert r.images.shape == (2, 3, 4 * H, 4 * W) and r.latents.shape == (2, 4, H, W)
    check_steps(ours_steps, ref_steps, f"g={guidance}")
    assert_parity(r.latents, ref_steps[-1], SAMPLER_TOL, "final latents")
    assert_parity(r.images, ref, SAMPLER_TOL, f"images g={guidance}")
    assert 0.05 < ((r.images > 0) & (r.images < 1)).float().mean()  # not a fully clamped comparison
    p = r.parameters
    assert (p["steps"], p["guidance"], p["noise_level"], p["seeds"], p["sampler"]) == (10, guidance, 20, [5, 6], "ddim")
    assert p["timesteps"] == list(range(901, 0, -100))
    assert ("negative_prompt" in p) == (guidance != 1)


@pytest.mark.parametrize("guidance,source", [(1.0, "fixture"), (9.0, "fixture"), (9.0, "export")])
def test_pipeline_matches_diffusers_injected_noise(guidance, source):
    """Fixed start latents and augmentation noise, embeddings instead of token ids, numpy output; ``export``: the
    diffusers pipeline reads sdup's own ``save_diffusers`` folder."""
    img = low_res(2)
    g = gens(11)
    aug = torch.cat([torch.randn((1, 3, H, W), generator=gi) for gi in g])  # diffusers' first draw per generator
    x_T = torch.randn((2, 4, H, W), generator=torch.Generator().manual_seed(99))
    ref, ref_steps = run_diffusers(diffusers_pipe(source), img, guidance, gens(11), "np", latents=x_T,
                                   noise_level=77)
    m = model()
    steps = []
    r = upscale_x4(m, img * 2 - 1, prompt_embeds=encode_prompts(m, token_ids()),
                   negative_embeds=encode_prompts(m, [""])[0], image_range=(-1, 1), noise_level=77, steps=10,
                   guidance=guidance, x_T=x_T, aug_noise=aug, seed=0, progress=False,
                   callback=lambda s: steps.append(s["x"]))
    check_steps(steps, ref_steps, f"{source} g={guidance}")
    assert_parity(r.images, ref, SAMPLER_TOL, f"{source} images g={guidance}")
    # the unclamped decode agrees too
    dec = diffusers_pipe(source).vae.decode(ref_steps[-1] / 0.08333).sample
    assert_parity(decode(m, r.latents), dec, SAMPLER_TOL, "decode")


def test_batch_independence_and_per_sample_noise_levels():
    img = low_res(3)
    both = upscale_x4(model(), img, token_ids(), steps=3, seed=[7, 8], noise_level=[10, 200], progress=False)
    second = upscale_x4(model(), img[1:], token_ids()[1:], steps=3, seed=8, noise_level=200, progress=False)
    torch.testing.assert_close(both.images[1:], second.images, rtol=0, atol=1e-5)
    assert both.parameters["noise_levels"] == [10, 200]
    assert both.sample_parameters(1)["noise_level"] == 200


# ------------------------------------------------------------------------------------------------
# input checking


@pytest.mark.parametrize("bad", [-1, 351, 2.5, True, "20", [10, 20, 30], torch.tensor([1.0, 2.0])])
def test_noise_level_validation(bad):
    with pytest.raises(ValueError, match="noise_level|noise levels"):
        upscale_x4(model(), low_res(), "", noise_level=bad, steps=1, progress=False)


@pytest.mark.parametrize("level", [0, 350])
def test_noise_level_bounds_accepted(level):
    r = upscale_x4(model(), low_res(), "", noise_level=level, steps=1, guidance=1, progress=False)
    assert torch.isfinite(r.images).all()


def test_sizes_padding_and_channels():
    m = model()
    assert unet_multiple(m) == 2
    img = low_res(4, (1, 3, 15, 21))
    r = upscale_x4(m, img[0], "", steps=2, guidance=1, progress=False)  # (3, h, w) accepted, padded to 16x22
    assert r.images.shape == (1, 3, 60, 84) and r.latents.shape == (1, 4, 16, 22)
    assert r.parameters["padding"] == {"mode": "replicate", "bottom": 1, "right": 1}
    with pytest.raises(ValueError, match="multiples of 2"):
        upscale_x4(m, img, "", steps=1, pad_mode=None, progress=False)
    rgba = torch.rand(1, 4, H, W)
    with pytest.raises(ValueError, match="RGBA"):
        upscale_x4(m, rgba, "", steps=1, progress=False)
    with pytest.raises(ValueError, match="image_range"):
        upscale_x4(m, low_res() * 2 - 1, "", steps=1, progress=False)  # [-1, 1] data declared as [0, 1]
    with pytest.raises(ValueError, match="x_T must have shape"):
        upscale_x4(m, low_res(), "", steps=1, x_T=torch.zeros(2, 4, 8, 8), progress=False)
    with pytest.raises(ValueError, match="no BPE tokenizer"):
        upscale_x4(m, low_res(), "a cat", steps=1, progress=False)
    with pytest.raises(ValueError, match="x4-upscaler"):
        upscale_x4(dataclasses.replace(m, family="sd1"), low_res(), "", steps=1, progress=False)


@pytest.mark.parametrize("sampler", ["plms", "euler", "euler_a", "dpmpp_2m"])
def test_other_samplers_run(sampler):
    r = upscale_x4(model(), low_res(), token_ids(), sampler=sampler, steps=3, progress=False)
    assert r.images.shape == (2, 3, 4 * H, 4 * W) and torch.isfinite(r.images).all()
    assert r.parameters["sampler"] == sampler


# ------------------------------------------------------------------------------------------------
# precision: half-precision UNet, fp32 VAE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_unet_keeps_fp32_vae(dtype):
    m = model(dtype)
    assert next(m.unet.parameters()).dtype == dtype and next(m.vae.parameters()).dtype == torch.float32
    img = low_res(5)
    r = upscale_x4(m, img, token_ids(), steps=4, seed=1, progress=False)
    ref = upscale_x4(model(), img, token_ids(), steps=4, seed=1, progress=False)
    assert r.images.dtype == torch.float32 and torch.isfinite(r.images).all() and torch.isfinite(r.latents).all()
    assert r.parameters["dtype"] == str(dtype).replace("torch.", "")
    assert (r.images - ref.images).abs().mean() < 0.05  # same picture, half-precision noise only


def test_decode_upcasts_a_half_precision_vae():
    m = model()
    half = dataclasses.replace(m, vae=__import__("copy").deepcopy(m.vae).half())
    z = torch.randn(1, 4, 6, 10, generator=torch.Generator().manual_seed(0)) * 0.1
    out = decode(half, z)
    assert out.dtype == torch.float32 and next(half.vae.parameters()).dtype == torch.float16  # not modified
    torch.testing.assert_close(out, decode(m, z), rtol=0, atol=5e-3)  # fp16-rounded weights, fp32 arithmetic


# ------------------------------------------------------------------------------------------------
# colour fix


def _blur_reference(x, r):
    """Independent blur: explicit clamped indexing instead of pad + dilated conv."""
    h, w = x.shape[-2:]
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    out = torch.zeros_like(x)
    for a in (-1, 0, 1):
        rows = (torch.arange(h) + a * r).clamp(0, h - 1)
        for b in (-1, 0, 1):
            cols = (torch.arange(w) + b * r).clamp(0, w - 1)
            out += k[a + 1, b + 1] * x[..., rows[:, None], cols[None, :]]
    return out


def _wavelet_reference(content, style):
    def split(x):
        high = torch.zeros_like(x)
        for i in range(5):
            low = _blur_reference(x, 2 ** i)
            high = high + (x - low)
            x = low
        return high, x
    return split(content.double())[0] + split(style.double())[1]


def test_adain_transfers_mean_and_std():
    content = torch.randn(2, 3, 20, 30, generator=torch.Generator().manual_seed(0)) * 0.3 + 0.2
    ref = torch.randn(2, 3, 20, 30, generator=torch.Generator().manual_seed(1)) * 0.1 - 0.4
    out = CF.color_fix(content, ref, "adain")
    flat, rflat = out.reshape(2, 3, -1), ref.reshape(2, 3, -1)
    torch.testing.assert_close(flat.mean(-1), rflat.mean(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(flat.std(-1), rflat.std(-1), rtol=1e-3, atol=0)  # exact up to the 1e-5 eps
    mu, s = CF.calc_mean_std(content)
    mu_r, s_r = CF.calc_mean_std(ref)
    torch.testing.assert_close(out, (content - mu) / s * s_r + mu_r)
    # a smaller reference is resized (bicubic) first; its batch of 1 is shared
    small = ref[:1, :, ::4, ::4]
    out2 = CF.color_fix(content, small, "adain")
    resized = F.interpolate(small, size=(20, 30), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out2, CF.adain(content, resized.expand(2, -1, -1, -1)))


def test_wavelet_color_fix():
    g = torch.Generator().manual_seed(2)
    content, ref = torch.rand(2, 3, 40, 52, generator=g) * 2 - 1, torch.rand(2, 3, 40, 52, generator=g) * 2 - 1
    out = CF.color_fix(content, ref, "wavelet")
    torch.testing.assert_close(out.double(), _wavelet_reference(content, ref), rtol=0, atol=1e-5)
    high, low = CF.wavelet_decomposition(content)
    torch.testing.assert_close(high + low, content, rtol=0, atol=1e-5)
    # the low frequencies come from the reference: out - high(content) == low(reference)
    torch.testing.assert_close(out - high, CF.wavelet_decomposition(ref)[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(CF.color_fix(content, content, "wavelet"), content, rtol=0, atol=1e-5)
    # a constant image stays constant; a constant colour shift of the reference shifts the output by exactly it
    const = torch.full((1, 3, 17, 23), 0.3)
    torch.testing.assert_close(CF.color_fix(const, const, "wavelet"), const, rtol=0, atol=1e-6)
    shift = torch.tensor([0.1, -0.2, 0.05]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(CF.color_fix(content, content + shift, "wavelet"), content + shift, rtol=0, atol=1e-5)
    # value range does not matter (linear): [0, 1] in, [0, 1] out
    out01 = CF.color_fix((content + 1) / 2, (ref + 1) / 2, "wavelet")
    torch.testing.assert_close(out01 * 2 - 1, out, rtol=0, atol=1e-5)
    # unbatched and half-precision inputs
    assert CF.color_fix(content[0], ref[0], "wavelet").shape == (3, 40, 52)
    assert CF.color_fix(content.half(), ref, "wavelet").dtype == torch.float16


def test_color_fix_rejects_rgba_and_bad_modes():
    rgb, rgba = torch.rand(1, 3, 8, 8), torch.rand(1, 4, 8, 8)
    for mode in ("adain", "wavelet", "none"):
        with pytest.raises(ValueError, match="RGBA"):
            CF.color_fix(rgba, rgb, mode)
        with pytest.raises(ValueError, match="RGBA"):
            CF.color_fix(rgb, rgba, mode)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        CF.color_fix(torch.rand(1, 1, 8, 8), rgb, "wavelet")
    with pytest.raises(ValueError, match="unknown colour fix"):
        CF.color_fix(rgb, rgb, "histogram")
    assert CF.color_fix(rgb, rgb, "none") is rgb


def test_pipeline_color_fix_option():
    img = low_res(6)
    r = upscale_x4(model(), img, token_ids(), steps=2, seed=3, color_fix_mode="wavelet", progress=False)
    plain = upscale_x4(model(), img, token_ids(), steps=2, seed=3, progress=False)
    raw = decode(model(), plain.latents)
    expected = ((CF.color_fix(raw, img * 2 - 1, "wavelet") + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(r.images, expected, rtol=0, atol=1e-6)
    assert r.parameters["color_fix"] == "wavelet"


def test_half_precision_decode_falls_back_to_fp32_when_not_finite():
    """vae_dtype=fp16: an ordinary latent decodes in fp16 (close to fp32, no warning); a latent whose fp16 decode
    overflows (x 1e5: beyond fp16's 65504 after post_quant_conv) is decoded again in fp32 -- exactly the fp32 result,
    finite, with one warning per sample -- instead of a NaN / black image. The VAE module itself is not converted."""
    m = model()
    z = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(0)) * 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out16 = decode(m, z, vae_dtype=torch.float16)
    ref = decode(m, z)
    assert next(m.vae.parameters()).dtype == torch.float32
    assert 0 < (out16 - ref).abs().max() < 2e-2
    big = torch.cat([z[:1], z[1:] * 1e5])
    with pytest.warns(RuntimeWarning, match="float16 VAE decode of sample 1 is not finite") as caught:
        out = decode(m, big, vae_dtype=torch.float16)
    assert len(caught) == 1 and torch.isfinite(out).all()
    assert torch.equal(out[1:], decode(m, big[1:]))
    r = upscale_x4(m, low_res(5), token_ids(), steps=2, seed=1, vae_dtype=torch.float16, progress=False)
    assert r.parameters["vae_dtype"] == "float16" and torch.isfinite(r.images).all()
