"""LDM UNet and KL-VAE: parity with the upstream fixtures (original layout) and with diffusers
(diffusers layout), key-map round trips, attention backends."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from helpers import FIXTURES, assert_parity, randomize_
from sdup.checkpoints import diffusers as dfs
from sdup.checkpoints import ldm
from sdup.checkpoints.io import read_state_dict
from sdup.models.unet import UNet, UNetConfig
from sdup.models.vae import AutoencoderKL, VAEConfig
from sdup.nn import TransformerBlock, use_attention_backend
from sdup.optimize import fuse_qkv

pytestmark = pytest.mark.usefixtures("no_grad")  # forward-only tests (conftest.py)



def ldm_params(family):
    return OmegaConf.to_container(OmegaConf.load(FIXTURES / family / "config.yaml"))["model"]["params"]


def ldm_unet(family):
    cfg = UNetConfig.from_ldm(ldm_params(family)["unet_config"]["params"])
    unet = UNet(cfg).eval()
    parts = ldm.split_components(read_state_dict(FIXTURES / family / "model.ckpt"))
    km = ldm.unet_keymap(cfg, unet.state_dict())
    unet.load_state_dict(km.to_sdup(parts["unet"]))
    return unet, km, parts["unet"]


def ldm_vae(family):
    cfg = VAEConfig.from_ldm(ldm_params(family)["first_stage_config"]["params"])
    vae = AutoencoderKL(cfg).eval()
    parts = ldm.split_components(read_state_dict(FIXTURES / family / "model.ckpt"))
    km = ldm.vae_keymap(cfg, vae.state_dict())
    vae.load_state_dict(km.to_sdup(parts["vae"]))
    return vae, km, parts["vae"]


def run_unet(unet, d):
    return unet(d["in.x"], d["in.timesteps"], d["in.context"], y=d.get("in.y"))


@pytest.mark.parametrize("family", ["sd1", "x4"])
@pytest.mark.parametrize("backend", ["sdpa", "math", "chunked"])
@pytest.mark.parametrize("fused", [False, True], ids=["", "fused-qkv"])
def test_unet_matches_upstream_fixture(family, backend, fused):
    unet, _, _ = ldm_unet(family)
    if fused:  # sdup.optimize.fuse_qkv: one q/k/v matmul per self-attention (x4: attn1 reads the text: not fused)
        blocks = [m for m in unet.modules() if isinstance(m, TransformerBlock)]
        assert fuse_qkv(unet) == sum(not b.self_attn_reads_context for b in blocks) > 0
    d = load_file(FIXTURES / family / "unet_forward.safetensors")
    with use_attention_backend(backend, chunk_size=64):  # 16x24 = 384 tokens -> 6 chunks
        assert_parity(run_unet(unet, d), d["out.model_output"], what=f"{family} unet {backend}")


@pytest.mark.parametrize("family", ["sd1", "x4"])
def test_fused_qkv_keeps_the_state_dict(family):
    """After fuse_qkv the state dict has the same keys and tensors (split on the way out), the key tables still map it
    to the original layout bit for bit, and load_state_dict of an unfused dict (joined on the way in) works."""
    unet, km, ext = ldm_unet(family)
    before = unet.state_dict()
    fuse_qkv(unet)
    after = unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert any(hasattr(m, "qkv_proj") for m in unet.modules())
    back = km.to_ext(after)
    assert all(torch.equal(back[k], v) for k, v in ext.items())
    other = {k: torch.randn_like(v) for k, v in before.items()}
    unet.load_state_dict(other)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in other.items())


def test_x4_conditioning_concat_order():
    unet, _, _ = ldm_unet("x4")
    d = load_file(FIXTURES / "x4" / "conditioning.safetensors")
    x = torch.cat([d["in.x"], d["in.x_aug"]], dim=1)  # latent first, low-res image second
    assert torch.equal(x, d["out.unet_input"])
    out = unet(x, d["in.timesteps"], d["in.context"], y=d["in.noise_level"])
    assert_parity(out, d["out.model_output"], what="x4 conditioned unet")


@pytest.mark.parametrize("family", ["sd1", "x4"])
def test_unet_from_diffusers_folder_matches_fixture(family):
    folder = FIXTURES / family / "diffusers" / "unet"
    cfg = dfs.unet_config(json.loads((folder / "config.json").read_text()))
    assert cfg == UNetConfig.from_ldm(ldm_params(family)["unet_config"]["params"]) or family == "x4"
    unet = UNet(cfg).eval()
    unet.load_state_dict(dfs.unet_keymap(cfg, unet.state_dict()).to_sdup(
        load_file(folder / "diffusion_pytorch_model.safetensors")))
    d = load_file(FIXTURES / family / "unet_forward.safetensors")
    assert_parity(run_unet(unet, d), d["out.model_output"], what=f"{family} diffusers unet")


@pytest.mark.parametrize("family", ["sd1", "x4", "stablesr"])
def test_vae_matches_upstream_fixture(family):
    vae, _, _ = ldm_vae(family)
    d = load_file(FIXTURES / family / "vae.safetensors")
    post = vae.encode(d["in.image"])
    assert_parity(post.mean, d["out.posterior_mean"], what="posterior mean")
    assert_parity(post.std, d["out.posterior_std"], what="posterior std")
    assert_parity(post.logvar, d["out.posterior_logvar"], what="posterior logvar")
    assert_parity(vae.decode(d["in.z"]), d["out.decode"], what="decode")
    scale = ldm_params(family)["scale_factor"]
    assert_parity(vae.decode(d["in.z"] / scale), d["out.decode_first_stage"], what="decode_first_stage")


def test_vae_from_diffusers_folder_matches_fixture():
    folder = FIXTURES / "sd1" / "diffusers" / "vae"
    cfg = dfs.vae_config(json.loads((folder / "config.json").read_text()))
    vae = AutoencoderKL(cfg).eval()
    vae.load_state_dict(dfs.vae_keymap(cfg, vae.state_dict()).to_sdup(
        load_file(folder / "diffusion_pytorch_model.safetensors")))
    d = load_file(FIXTURES / "sd1" / "vae.safetensors")
    assert_parity(vae.encode(d["in.image"]).mean, d["out.posterior_mean"])
    assert_parity(vae.decode(d["in.z"]), d["out.decode"])


def test_vae_chunked_attention_and_sample():
    vae, _, _ = ldm_vae("sd1")
    d = load_file(FIXTURES / "sd1" / "vae.safetensors")
    with use_attention_backend("chunked", chunk_size=7):
        assert_parity(vae.decode(d["in.z"]), d["out.decode"], what="chunked decode")
    post = vae.encode(d["in.image"])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(post.sample(g1), post.sample(g2))
    noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(post.sample(noise=noise), post.mean + post.std * noise)
    assert torch.equal(post.mode(), post.mean)


@pytest.mark.parametrize("family", ["sd1", "x4"])
def test_ldm_round_trip_is_bit_exact(family):
    for build in (ldm_unet, ldm_vae):
        module, km, ext = build(family)
        back = km.to_ext(module.state_dict())
        assert set(back) == set(ext)
        assert all(torch.equal(back[k], ext[k]) for k in ext)


def test_diffusers_round_trip_is_bit_exact():
    for comp, cfg_fn, km_fn, cls in (("unet", dfs.unet_config, dfs.unet_keymap, UNet),
                                     ("vae", dfs.vae_config, dfs.vae_keymap, AutoencoderKL)):
        folder = FIXTURES / "sd1" / "diffusers" / comp
        cfg = cfg_fn(json.loads((folder / "config.json").read_text()))
        ext = load_file(folder / "diffusion_pytorch_model.safetensors")
        km = km_fn(cfg, cls(cfg).state_dict())
        back = km.to_ext(km.to_sdup(ext))
        assert set(back) == set(ext) and all(torch.equal(back[k], ext[k]) for k in ext)


def test_strict_keys():
    from sdup.checkpoints.keymap import KeyMismatch
    unet, km, ext = ldm_unet("sd1")
    extra = dict(ext, **{"input_blocks.99.0.weight": torch.zeros(1)})
    with pytest.raises(KeyMismatch, match="input_blocks.99.0.weight"):
        km.to_sdup(extra)
    missing = dict(ext)
    missing.pop("out.2.bias")
    with pytest.raises(KeyMismatch, match="out.2.bias"):
        km.to_sdup(missing)


# --- against diffusers models with random weights (channel-changing levels, batch 3, non-square) ---

DIFFUSERS_UNETS = {
    "sd1-like": dict(block_out_channels=(32, 64, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                     cross_attention_dim=48, layers_per_block=2),
    "sd2-v-like": dict(block_out_channels=(32, 64, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4, 4),
                       cross_attention_dim=40, layers_per_block=1, use_linear_projection=True, transformer_layers_per_block=2),
    "x4-like": dict(in_channels=7, block_out_channels=(32, 64, 64, 96), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    attention_head_dim=2, cross_attention_dim=96, layers_per_block=2, use_linear_projection=True,
                    only_cross_attention=(True, True, True, False), num_class_embeds=1000),
}


@pytest.mark.parametrize("name", list(DIFFUSERS_UNETS))
def test_unet_matches_diffusers(name):
    from diffusers import UNet2DConditionModel
    kw = dict(DIFFUSERS_UNETS[name], norm_num_groups=32, sample_size=16, out_channels=4)
    kw.setdefault("in_channels", 4)
    ref = randomize_(UNet2DConditionModel(**kw), seed=1).eval()
    cfg = dfs.unet_config(dict(ref.config))
    unet = UNet(cfg).eval()
    km = dfs.unet_keymap(cfg, unet.state_dict())
    unet.load_state_dict(km.to_sdup(ref.state_dict()))
    g = torch.Generator().manual_seed(0)
    b, h, w = 3, 16, 24
    x = torch.randn(b, kw["in_channels"], h, w, generator=g)
    t = torch.tensor([981, 500, 37])
    ctx = torch.randn(b, 77, kw["cross_attention_dim"], generator=g)
    y = torch.tensor([20, 350, 0]) if kw.get("num_class_embeds") else None
    expected = ref(x, t, encoder_hidden_states=ctx, class_labels=y).sample
    assert_parity(unet(x, t, ctx, y=y), expected, what=name)
    back = km.to_ext(unet.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("boc", [(32, 64, 64, 64), (32, 64, 96)])
def test_vae_matches_diffusers(boc):
    from diffusers import AutoencoderKL as DAutoencoderKL
    n = len(boc)
    ref = randomize_(DAutoencoderKL(block_out_channels=boc, down_block_types=("DownEncoderBlock2D",) * n,
                                    up_block_types=("UpDecoderBlock2D",) * n, latent_channels=4, norm_num_groups=32,
                                    layers_per_block=2), seed=2).eval()
    cfg = dfs.vae_config(dict(ref.config))
    vae = AutoencoderKL(cfg).eval()
    vae.load_state_dict(dfs.vae_keymap(cfg, vae.state_dict()).to_sdup(ref.state_dict()))
    g = torch.Generator().manual_seed(0)
    f = 2 ** (n - 1)
    img = torch.randn(2, 3, 8 * f // 2 * 2, 12 * f, generator=g)
    z = torch.randn(3, 4, 5, 7, generator=g)
    dist = ref.encode(img).latent_dist
    post = vae.encode(img)
    assert_parity(post.mean, dist.mean, what="mean")
    assert_parity(post.std, dist.std, what="std")
    assert_parity(vae.decode(z), ref.decode(z).sample, what="decode")
