"""The one decoder (``sdup.pipelines.decoding.decode_scaled``) on StableSR's CFW autoencoder: the encoder features
fused plain or tiled as the module's own ``decode``, and the non-finite half-precision fallback to fp32 that the other
pipelines' VAEs have (tests/test_x4_pipeline.py)."""
import warnings

import pytest
import torch

import sdup
from helpers import FIXTURES
from sdup.pipelines.decoding import decode_scaled, recorded_dtype
from sdup.pipelines.stablesr import prepare_stablesr

pytestmark = [pytest.mark.usefixtures("no_grad", "one_thread")]
D = FIXTURES / "stablesr"
SCALE = 0.18215


@pytest.fixture(scope="module")
def cfw():
    return sdup.load(D / "cfw_vae.ckpt", config=D / "cfw_vae_config.yaml").vae


def encoded(cfw, batch=2):
    """(scaled latents (B, 4, 4, 6), each sample's encoder features) of random 32x48 images."""
    x = torch.rand(batch, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    zs, feats = [], []
    for i in range(batch):
        post, f = cfw.encode(x[i:i + 1])
        zs.append(post.mean * SCALE)
        feats.append(f)
    return torch.cat(zs), feats


def test_cfw_features_plain_and_tiled_as_the_module(cfw):
    z, feats = encoded(cfw)
    want = torch.cat([cfw.decode(z[i:i + 1] / SCALE, feats[i], 0.5) for i in range(2)])
    assert torch.equal(decode_scaled(cfw, z, SCALE, features=feats, dec_w=0.5), want)
    tiled = decode_scaled(cfw, z, SCALE, features=feats, dec_w=0.5, vae_tile=2, vae_overlap=1)
    torch.testing.assert_close(tiled, want, rtol=0, atol=1e-5)
    plain = torch.cat([cfw.decode(z[i:i + 1] / SCALE) for i in range(2)])
    assert torch.equal(decode_scaled(cfw, z, SCALE, features=feats, dec_w=0.0), plain)


def test_cfw_half_precision_falls_back_to_fp32_when_not_finite(cfw):
    """fp16: an ordinary latent decodes in fp16 (close to fp32, no warning); one whose fp16 decode overflows is
    decoded again in fp32 -- exactly the fp32 result -- with one warning, the module left in fp32."""
    z, feats = encoded(cfw)
    ref = decode_scaled(cfw, z, SCALE, features=feats, dec_w=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out16 = decode_scaled(cfw, z, SCALE, features=feats, dec_w=0.5, vae_dtype=torch.float16)
    assert 0 < (out16 - ref).abs().max() < 2e-2
    big = torch.cat([z[:1], z[1:] * 1e5])
    with pytest.warns(RuntimeWarning, match="float16 VAE decode of sample 1 is not finite") as caught:
        out = decode_scaled(cfw, big, SCALE, features=feats, dec_w=0.5, vae_dtype=torch.float16)
    assert len(caught) == 1 and torch.isfinite(out).all()
    assert torch.equal(out[1:], decode_scaled(cfw, big[1:], SCALE, features=feats[1:], dec_w=0.5))
    assert next(cfw.parameters()).dtype == torch.float32


def test_stablesr_job_decodes_through_it(cfw):
    """prepare_stablesr's decode is ``decode_scaled`` with the CFW features: its own dtype by default, vae_dtype
    recorded; a fp16 decode of an overflowing latent comes back finite."""
    model = sdup.load(D / "model.ckpt", config=D / "config.yaml")
    kw = dict(steps=2, input_size=32, progress=False)
    image = torch.rand(1, 3, 12, 20, generator=torch.Generator().manual_seed(1))
    job = prepare_stablesr(model, cfw, image, **kw)
    assert job.parameters["vae_dtype"] == "float32" == recorded_dtype(cfw, None, None)
    half = prepare_stablesr(model, cfw, image, vae_dtype=torch.float16, **kw)
    assert half.parameters["vae_dtype"] == "float16"
    z = torch.randn(job.x_T.shape, generator=torch.Generator().manual_seed(2)) * 1e5
    with pytest.warns(RuntimeWarning, match="not finite"):
        out = half.decode(z)
    assert torch.isfinite(out).all() and torch.equal(out, job.decode(z))
