"""Full-size UNets and VAEs (random weights) on every memory format and dtype path of sdup.optimize.prepare: fp32
channels_last == fp32 contiguous within the parity criterion; bf16 (contiguous and channels_last) within
2e-2 * max|fp32| of fp32; the bf16 VAE decode (sdup.pipelines.decoding.decode_scaled, vae_dtype=bf16) within 5e-2 of
fp32 on [0, 1] pixels. Slow: GBs of RAM, minutes."""
import copy
import json

import pytest
import torch

from helpers import MANIFESTS, assert_parity
from sdup.checkpoints import diffusers as dfs
from sdup.models.unet import UNet
from sdup.models.vae import AutoencoderKL
from sdup.optimize import prepare
from sdup.pipelines.decoding import decode_scaled

pytestmark = pytest.mark.slow
CONFIGS = json.loads((MANIFESTS / "diffusers_configs.json").read_text())["configs"]
SD1, X4 = "CompVis/stable-diffusion-v1-4", "stabilityai/stable-diffusion-x4-upscaler"


def config(repo, comp):
    return {k: v for k, v in CONFIGS[repo][comp].items() if not k.startswith("_")}


def variants(module, dtype):
    """{memory format: prepared copy of ``module`` in ``dtype``}."""
    out = {}
    for fmt in ("contiguous", "channels_last"):
        m = copy.deepcopy(module).to(dtype)
        assert prepare(m, fmt) == fmt
        out[fmt] = m
    return out


@pytest.mark.parametrize("repo", [SD1, X4])
@torch.inference_mode()
def test_full_size_unet_every_layout_and_dtype(repo):
    torch.manual_seed(0)
    cfg = dfs.unet_config(config(repo, "unet"))
    unet = UNet(cfg).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 32, 48, generator=g)
    t = torch.tensor([981, 37])
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g)
    y = torch.tensor([20, 350]) if cfg.num_classes else None
    ref = unet(x, t, ctx, y=y)
    for fmt, m in variants(unet, torch.float32).items():
        assert_parity(m(x, t, ctx, y=y), ref, what=f"fp32 {fmt}")
    for fmt, m in variants(unet, torch.bfloat16).items():
        err = (m(x.bfloat16(), t, ctx.bfloat16(), y=y).float() - ref).abs().max().item()
        print(f"{repo} bf16 {fmt}: max|Δ| {err:.3e} = {err / ref.abs().max().item():.2%} of max|fp32|")
        assert err < 2e-2 * ref.abs().max().item(), (fmt, err)


@pytest.mark.parametrize("repo", [SD1, X4])
@torch.inference_mode()
def test_full_size_vae_decode_every_layout_and_dtype(repo):
    torch.manual_seed(0)
    vae = AutoencoderKL(dfs.vae_config(config(repo, "vae"))).eval()
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = vae.decode(z)
    pixels = lambda x: ((x.float() + 1) / 2).clamp(0, 1)  # noqa: E731
    for fmt, m in variants(vae, torch.float32).items():
        assert_parity(m.decode(z), ref, what=f"fp32 {fmt}")
    for fmt, m in variants(vae, torch.bfloat16).items():
        err = (pixels(m.decode(z.bfloat16())) - pixels(ref)).abs().max().item()
        print(f"{repo} VAE bf16 {fmt}: max|Δ| on [0, 1] pixels {err:.3e}")
        assert err < 5e-2, (fmt, err)  # measured 256^2, sdup's default init: 3.3e-2 (SD), 3.4e-2 (x4)
    prepare(vae)  # the pipelines' path: fp32 module, bf16 copies of its weights per decode, non-finite fallback kept
    got = decode_scaled(vae, z, 1.0, vae_dtype=torch.bfloat16)
    assert got.dtype == torch.float32 and (pixels(got) - pixels(ref)).abs().max().item() < 5e-2
