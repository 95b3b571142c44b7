"""Opt-in speed paths (sdup.optimize) and low precision on the tiny upstream fixtures: compiled == eager, bf16 close
to fp32."""
from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import load_file

import sdup
from helpers import FIXTURES, assert_parity
from sdup.optimize import compile_model, fuse_qkv

SD1 = FIXTURES / "sd1"


def sd1():
    return sdup.load(SD1 / "model.ckpt", config=SD1 / "config.yaml")


@pytest.mark.slow
def test_compiled_unet_and_decoder_match_eager():
    """torch.compile (inductor, dynamic shapes) of the fused UNet and the VAE decoder forwards: the fixture within 1e-5, and a
    second latent size / timestep runs without error (dynamic=True)."""
    m = sd1()
    d = load_file(SD1 / "unet_forward.safetensors")
    with torch.no_grad():
        eager = m.unet(d["in.x"], d["in.timesteps"], d["in.context"])
        z = torch.randn(1, 4, 12, 16)
        eager_img = m.vae.decode(z)
        fuse_qkv(m)  # as scripts/upscale.py: fused q/k/v, then compiled
        compile_model(m)
        t0 = time.time()
        got = m.unet(d["in.x"], d["in.timesteps"], d["in.context"])
        print(f"first compiled call {time.time() - t0:.0f} s")
        assert_parity(got, d["out.model_output"], what="compiled unet vs upstream")
        assert_parity(got, eager, what="compiled vs eager")
        assert_parity(m.vae.decode(z), eager_img, what="compiled decoder")
        x2 = torch.randn(1, 4, 24, 16)
        out = m.unet(x2, torch.tensor([7]), d["in.context"][:1])
        assert out.shape == x2.shape and torch.isfinite(out).all()


def test_bf16_unet_close_to_fp32():
    """The UNet in bf16 (``sdup.load(..., dtype=torch.bfloat16)``; GroupNorm in fp32 as GroupNorm32) stays within
    2e-2 of the fp32 output, relative to its range."""
    d = load_file(SD1 / "unet_forward.safetensors")
    m16 = sdup.load(SD1 / "model.ckpt", config=SD1 / "config.yaml", dtype=torch.bfloat16)
    assert next(m16.unet.parameters()).dtype == torch.bfloat16 and next(m16.vae.parameters()).dtype == torch.float32
    with torch.no_grad():
        got = m16.unet(d["in.x"].bfloat16(), d["in.timesteps"], d["in.context"].bfloat16()).float()
    ref = d["out.model_output"]
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert err < 2e-2, err


@pytest.mark.slow
def test_frozen_compile_matches_eager():
    """compile_model(freeze=True) (inductor freezing: weights as constants, static shapes) on a bare, fused UNet under
    no_grad: the fixture within 1e-5; a second latent size recompiles and runs."""
    m = sd1()
    d = load_file(SD1 / "unet_forward.safetensors")
    with torch.no_grad():
        eager = m.unet(d["in.x"], d["in.timesteps"], d["in.context"])
        fuse_qkv(m.unet)
        assert compile_model(m.unet, freeze=True) is m.unet
        got = m.unet(d["in.x"], d["in.timesteps"], d["in.context"])
        assert_parity(got, d["out.model_output"], what="frozen compiled unet vs upstream")
        assert_parity(got, eager, what="frozen compiled vs eager")
        x2 = torch.randn(1, 4, 24, 16)
        out = m.unet(x2, torch.tensor([7]), d["in.context"][:1])
        assert out.shape == x2.shape and torch.isfinite(out).all()


def test_compile_model_wraps_the_requested_forwards_lazily():
    """compile_model only replaces forwards (torch.compile is lazy: nothing compiles here): the UNet and the VAE
    decoder of a LoadedModel, or a bare module's own forward; the state dicts are untouched."""
    m = sd1()
    keys = set(m.unet.state_dict())
    compile_model(m, vae_decoder=False)
    assert "forward" in vars(m.unet) and "forward" not in vars(m.vae.decoder)
    assert set(m.unet.state_dict()) == keys
    compile_model(m.vae.decoder, freeze=True)
    assert "forward" in vars(m.vae.decoder) and "forward" not in vars(m.vae)
