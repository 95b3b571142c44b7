"""The one conditioning rule (``sdup.pipelines.conditioning.check_prompts``), the same for x4, x2, StableSR and
txt2img: each side (prompt, negative prompt) is text / token ids or embeddings; None or "" with embeddings is
fine, other text with embeddings raises a ValueError naming both; without embeddings a prompt left at None is ""
except in txt2img, which needs one."""
import functools

import pytest
import torch

import sdup
from helpers import FIXTURES
from sdup.pipelines.stablesr import prepare_stablesr
from sdup.pipelines.txt2img import prepare_txt2img
from sdup.pipelines.x2_latent import prepare_x2
from sdup.pipelines.x4 import prepare_x4

pytestmark = [pytest.mark.usefixtures("no_grad", "one_thread")]
PIPELINES = ("x4", "x2", "stablesr", "txt2img")
IDS = [254, 5, 255]          # a non-empty token-id prompt of the tiny vocabulary (254 / 255 = start / end)


@functools.lru_cache(maxsize=None)
def model(name):
    if name == "x2":
        return sdup.load(FIXTURES / "latent_upscaler" / "diffusers")
    folder = FIXTURES / {"x4": "x4", "stablesr": "stablesr", "txt2img": "sd1"}[name]
    return sdup.load(folder / "model.ckpt", config=folder / "config.yaml")


def prepare(name, **kw):
    """The pipeline's job on a tiny input, guidance 2 (both sides are encoded), one or two steps."""
    kw = dict(guidance=2.0, progress=False, **kw)
    gen = torch.Generator().manual_seed(0)
    if name == "x4":
        return prepare_x4(model(name), torch.rand(1, 3, 16, 24, generator=gen), steps=1, **kw)
    if name == "x2":
        return prepare_x2(model(name), torch.randn(1, 4, 8, 12, generator=gen), steps=1, decode=False, **kw)
    if name == "stablesr":
        return prepare_stablesr(model(name), None, torch.rand(1, 3, 12, 20, generator=gen), steps=2, input_size=32,
                                **kw)
    return prepare_txt2img(model(name), height=48, width=64, steps=1, **kw)


def embeddings(name, side):
    """(77, D) embeddings for one side, plus the pooled vector the x2 UNet also needs."""
    g = torch.Generator().manual_seed(1 if side == "prompt" else 2)
    m = model(name)
    width = m.unet.cfg.cross_cond_dim if name == "x2" else m.unet.cfg.context_dim
    e = torch.randn(77, width, generator=g)
    if name != "x2":
        return e, {}
    pooled = torch.randn(m.unet.cfg.mapping_cond_dim - m.unet.cfg.noise_aug_dim, generator=g)
    return e, {("pooled_prompt_embeds" if side == "prompt" else "negative_pooled_embeds"): pooled}


def side_kwargs(name, side, text):
    e, extra = embeddings(name, side)
    key = "prompt_embeds" if side == "prompt" else "negative_embeds"
    return e, {side: text, key: e, **extra}


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("side", ["prompt", "negative_prompt"])
def test_text_and_embeddings_together_raise_naming_both(name, side):
    _, kw = side_kwargs(name, side, IDS)
    if side == "negative_prompt" and name == "txt2img":
        kw["prompt"] = IDS
    key = "prompt_embeds" if side == "prompt" else "negative_embeds"
    with pytest.raises(ValueError, match=f"give either {side} or {key}, not both"):
        prepare(name, **kw)


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("text", ["", None])
def test_empty_text_with_embeddings_uses_the_embeddings(name, text):
    e, kw = side_kwargs(name, "prompt", text)
    ne, nkw = side_kwargs(name, "negative_prompt", text)
    job = prepare(name, **kw, **nkw)
    assert torch.equal(job.extra_args["cond"]["context"].cpu(), e[None])
    assert torch.equal(job.extra_args["uncond"]["context"].cpu(), ne[None])
    assert job.parameters["prompt"] == job.parameters["negative_prompt"] == "<embeddings>"


@pytest.mark.parametrize("name", PIPELINES)
def test_a_prompt_left_at_none(name):
    """None without embeddings: "" for the upscalers (their reference prompt); txt2img needs a prompt."""
    if name == "txt2img":
        with pytest.raises(ValueError, match="give a prompt"):
            prepare(name, prompt=None)
        return
    job = prepare(name, prompt=None)
    assert job.parameters["prompt"] == "" and job.parameters["negative_prompt"] == ""
    assert torch.equal(job.extra_args["cond"]["context"], prepare(name, prompt="").extra_args["cond"]["context"])
