"""sd-x2-latent-upscaler K-UNet: parity with diffusers (fixture and random tiny configs), the two key
layouts (diffusers folder, original k-diffusion file) incl. full-size key sets, round trips, strictness."""
import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from helpers import FIXTURES, MANIFESTS, assert_parity, randomize_
from sdup.checkpoints.diffusers import kunet_config, kunet_diffusers_config, kunet_diffusers_keymap
from sdup.checkpoints.kdiffusion import (NOISE_AUG_KEY, kdiffusion_kernels,
                                         kunet_config_from_shapes, kunet_kdiffusion_keymap)
from sdup.checkpoints.keymap import KeyMismatch
from sdup.models.latent_upscaler import KUNet, KUNetConfig
from sdup.nn import use_attention_backend
from sdup.optimize import fuse_qkv

pytestmark = pytest.mark.usefixtures("no_grad")  # forward-only tests (conftest.py)

LU = FIXTURES / "latent_upscaler"
UNET_DIR = LU / "diffusers" / "unet"

# the original k-diffusion config (config_laion_text_cond_latent_upscaler_2.json)
KDIFFUSION_CONFIG = {"model": {
    "type": "image_v1", "input_channels": 4, "input_size": [48, 48], "patch_size": 1, "mapping_out": 768,
    "mapping_cond_dim": 896, "unet_cond_dim": 4, "depths": [4, 4, 4, 4], "channels": [384, 384, 768, 768],
    "self_attn_depths": [False, False, False, True], "cross_attn_depths": [False, True, True, True],
    "cross_cond_dim": 768, "has_variance": True, "dropout_rate": 0.0, "augment_wrapper": False,
    "sigma_data": 1.0, "skip_stages": 0}}


def fixture_unet():
    """(KUNet, its config, the diffusers state dict) of the fixture folder."""
    cfg = kunet_config(json.loads((UNET_DIR / "config.json").read_text()))
    ext = load_file(str(UNET_DIR / "diffusion_pytorch_model.safetensors"))
    unet = KUNet(cfg).eval()
    unet.load_state_dict(kunet_diffusers_keymap(cfg).to_sdup(ext))
    return unet, cfg, ext


def meta_shapes(cfg: KUNetConfig) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in KUNet(cfg).state_dict().items()}


def manifest(name: str) -> dict:
    return {k: tuple(v[0]) for k, v in json.loads((MANIFESTS / name).read_text()).items()}


# ------------------------------------------------------------------------------------------------
# numerics

@pytest.mark.parametrize("backend", ["sdpa", "math", "chunked"])
@pytest.mark.parametrize("fused", [False, True], ids=["", "fused-qkv"])
def test_fixture_forward_parity(backend, fused):
    unet, cfg, _ = fixture_unet()
    if fused:  # sdup.optimize.fuse_qkv on the self-attention layers
        assert fuse_qkv(unet) > 0
    f = load_file(str(LU / "unet_forward.safetensors"))
    with use_attention_backend(backend, chunk_size=64):
        out = unet(f["in.sample"], f["in.timestep"], f["in.timestep_cond"], f["in.encoder_hidden_states"])
    err = assert_parity(out, f["out.sample"], what=f"K-UNet vs diffusers fixture ({backend})")
    print(f"fixture K-UNet ({backend}): max|Δ| = {err:.2e}")


def test_fixture_config_sources_agree():
    _, cfg, ext = fixture_unet()
    used = json.loads((LU / "unet_config_used.json").read_text())
    assert kunet_config(used) == cfg
    assert kunet_config_from_shapes({k: v.shape for k, v in ext.items()}, "diffusers", head_dim=8) == cfg
    assert cfg.channels == (32, 32, 64, 64) and cfg.depths == (1, 1, 1, 1) and cfg.head_dim == 8
    assert cfg.mapping_out == 64 and cfg.mapping_cond_dim == 160 and cfg.cross_cond_dim == 32


TINY_DIFFUSERS = {  # another tiny K-UNet: 2 layers per block, 2 heads of 16 at width 32, text width 24
    "in_channels": 8, "out_channels": 5, "down_block_types": ["KDownBlock2D"] + ["KCrossAttnDownBlock2D"] * 3,
    "mid_block_type": None, "up_block_types": ["KCrossAttnUpBlock2D"] * 3 + ["KUpBlock2D"],
    "block_out_channels": [32, 32, 64, 64], "layers_per_block": 2, "act_fn": "gelu", "norm_num_groups": None,
    "norm_eps": 1e-5, "cross_attention_dim": 24, "attention_head_dim": 16, "time_cond_proj_dim": 88,
    "resnet_time_scale_shift": "scale_shift", "time_embedding_type": "fourier", "timestep_post_act": "gelu",
    "conv_in_kernel": 1, "conv_out_kernel": 1, "sample_size": None,
}


@pytest.fixture(scope="module")
def random_pair():
    """A randomly initialised diffusers K-UNet (every weight perturbed, norms around 1) and the KUNet
    loaded from it."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**TINY_DIFFUSERS).eval()
    randomize_(ref, seed=1, std=0.05)
    ref.time_proj.weight.copy_(torch.randn(ref.time_proj.weight.shape, generator=torch.Generator().manual_seed(2)))
    cfg = kunet_config(TINY_DIFFUSERS)
    unet = KUNet(cfg).eval()
    unet.load_state_dict(kunet_diffusers_keymap(cfg).to_sdup(ref.state_dict()))
    return ref, unet, cfg


def tiny_inputs(batch: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 8, 16, 24, generator=g)
    c_noise = torch.log(torch.tensor([0.03, 1.0, 14.6, 0.4, 5.0, 0.1][:batch])) / 4
    mapping_cond = torch.randn(batch, 88, generator=g)
    context = torch.randn(batch, 77, 24, generator=g)
    return x, c_noise, mapping_cond, context


def test_random_config_matches_diffusers_config(random_pair):
    from diffusers import UNet2DConditionModel
    ref, unet, cfg = random_pair
    assert cfg.depths == (2, 2, 2, 2) and cfg.head_dim == 16 and cfg.self_attn_depths == (False, False, False, True)
    exported = kunet_diffusers_config(cfg)  # what sdup writes as unet/config.json
    with torch.device("meta"):
        rebuilt = UNet2DConditionModel(**{k: v for k, v in exported.items() if not k.startswith("_")})
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("cfg_batch", [False, True], ids=["batch3", "cfg_batch6"])
def test_random_forward_parity(random_pair, cfg_batch):
    ref, unet, _ = random_pair
    x, c_noise, mapping_cond, context = tiny_inputs(3)
    if cfg_batch:  # classifier-free guidance: the latents twice, [negative, positive] conditioning
        _, _, neg_mapping, neg_context = tiny_inputs(3, seed=4)
        x, c_noise = torch.cat([x, x]), torch.cat([c_noise, c_noise])
        mapping_cond, context = torch.cat([neg_mapping, mapping_cond]), torch.cat([neg_context, context])
    expected = ref(x, c_noise, encoder_hidden_states=context, timestep_cond=mapping_cond).sample
    out = unet(x, c_noise, mapping_cond, context)
    assert out.shape == (x.shape[0], 5, 16, 24) and expected.abs().max() > 0.1
    err = assert_parity(out, expected, what="K-UNet vs random diffusers K-UNet")
    print(f"random tiny K-UNet ({'CFG batch 6' if cfg_batch else 'batch 3'}): max|Δ| = {err:.2e} "
          f"(max|ref| {expected.abs().max():.2f})")
    if cfg_batch:  # the positive half is the plain batch-3 result
        single = unet(*tiny_inputs(3))
        assert_parity(out[3:], single, what="CFG half vs single batch")


def test_random_forward_parity_with_text_mask(random_pair):
    """context_mask (1 = token, 0 = padding) == diffusers' encoder_attention_mask (-10000 on padded keys)."""
    ref, unet, _ = random_pair
    x, c_noise, mapping_cond, context = tiny_inputs(3)
    mask = torch.zeros(3, 77)
    mask[0, :4], mask[1, :], mask[2, :30] = 1, 1, 1
    expected = ref(x, c_noise, encoder_hidden_states=context, timestep_cond=mapping_cond,
                   encoder_attention_mask=mask).sample
    for backend in ("sdpa", "math"):
        with use_attention_backend(backend):
            out = unet(x, c_noise, mapping_cond, context, context_mask=mask.bool())
        assert_parity(out, expected, what=f"masked K-UNet ({backend})")
    unmasked = unet(x, c_noise, mapping_cond, context)
    assert (unmasked - expected).abs().max() > 1e-3  # the mask does something


# ------------------------------------------------------------------------------------------------
# the original k-diffusion layout

def original_key_shapes(F=768, C=(384, 384, 768, 768), depth=4, self_attn=(0, 0, 0, 1), cross=(0, 1, 1, 1),
                        text=768, cond=896, noise_feats=64) -> dict:
    """Key -> shape of the original ``model_ema`` dict, written out from the released config (k-diffusion's
    Sequential module lists: DBlock = [Identity|Downsample2d, (Res, [Self], [Cross]) x depth],
    UBlock = [(Res, [Self], [Cross]) x depth, Identity|Upsample2d])."""
    P = "inner_model."
    keys = {P + "timestep_embed.weight": (F // 2, 1), P + "mapping_cond.weight": (F, cond),
            P + "mapping.0.weight": (F, F), P + "mapping.0.bias": (F,), P + "mapping.2.weight": (F, F),
            P + "mapping.2.bias": (F,), P + "proj_in.weight": (C[0], 8, 1, 1), P + "proj_in.bias": (C[0],),
            P + "proj_out.weight": (5, C[0], 1, 1), P + "proj_out.bias": (5,),
            "low_res_noise_embed.weight": (noise_feats, 1)}

    def add_layers(prefix, index, level, c_in, c_out):
        mid = C[level]
        for j in range(depth):
            i_, o_ = (c_in if j == 0 else mid), (c_out if j == depth - 1 else mid)
            r = f"{prefix}.{index}."
            keys.update({r + "main.0.mapper.weight": (2 * i_, F), r + "main.0.mapper.bias": (2 * i_,),
                         r + "main.2.weight": (mid, i_, 3, 3), r + "main.2.bias": (mid,),
                         r + "main.4.mapper.weight": (2 * mid, F), r + "main.4.mapper.bias": (2 * mid,),
                         r + "main.6.weight": (o_, mid, 3, 3), r + "main.6.bias": (o_,)})
            if i_ != o_:
                keys[r + "skip.weight"] = (o_, i_, 1, 1)
            index += 1
            if self_attn[level]:
                a = f"{prefix}.{index}."
                keys.update({a + "norm_in.mapper.weight": (2 * o_, F), a + "norm_in.mapper.bias": (2 * o_,),
                             a + "qkv_proj.weight": (3 * o_, o_, 1, 1), a + "qkv_proj.bias": (3 * o_,),
                             a + "out_proj.weight": (o_, o_, 1, 1), a + "out_proj.bias": (o_,)})
                index += 1
            if cross[level]:
                a = f"{prefix}.{index}."
                keys.update({a + "norm_enc.weight": (text,), a + "norm_enc.bias": (text,),
                             a + "norm_dec.mapper.weight": (2 * o_, F), a + "norm_dec.mapper.bias": (2 * o_,),
                             a + "q_proj.weight": (o_, o_, 1, 1), a + "q_proj.bias": (o_,),
                             a + "kv_proj.weight": (2 * o_, text), a + "kv_proj.bias": (2 * o_,),
                             a + "out_proj.weight": (o_, o_, 1, 1), a + "out_proj.bias": (o_,)})
                index += 1
        return index

    n = len(C)
    for b in range(n):
        if b > 0:
            keys[f"{P}u_net.d_blocks.{b}.0.kernel"] = (4, 4)
        add_layers(f"{P}u_net.d_blocks.{b}", 1, b, C[max(b - 1, 0)], C[b])
    for u in range(n):
        b = n - 1 - u
        end = add_layers(f"{P}u_net.u_blocks.{u}", 0, b, C[b] if b == n - 1 else 2 * C[b], C[max(b - 1, 0)])
        if b > 0:
            keys[f"{P}u_net.u_blocks.{u}.{end}.kernel"] = (4, 4)
    return keys


RELEASED_SHAPES = {  # shapes of the released sd-x2-latent-upscaler .pth
    "inner_model.timestep_embed.weight": (384, 1),
    "inner_model.mapping_cond.weight": (768, 896),
    "inner_model.proj_in.weight": (384, 8, 1, 1),
    "inner_model.proj_out.weight": (5, 384, 1, 1),
    "inner_model.u_net.d_blocks.0.4.main.4.mapper.weight": (768, 768),
    "inner_model.u_net.d_blocks.0.1.main.6.weight": (384, 384, 3, 3),
    "inner_model.u_net.d_blocks.1.8.norm_enc.weight": (768,),
    "inner_model.u_net.d_blocks.1.2.norm_dec.mapper.weight": (768, 768),
    "inner_model.u_net.d_blocks.1.4.q_proj.weight": (384, 384, 1, 1),
    "inner_model.u_net.d_blocks.1.6.kv_proj.weight": (768, 768),
    "inner_model.u_net.d_blocks.1.8.out_proj.weight": (384, 384, 1, 1),
    "inner_model.u_net.d_blocks.2.1.main.2.weight": (768, 384, 3, 3),
    "inner_model.u_net.d_blocks.2.1.skip.weight": (768, 384, 1, 1),
    "inner_model.u_net.d_blocks.3.10.main.0.mapper.weight": (1536, 768),
    "inner_model.u_net.d_blocks.3.11.norm_in.mapper.weight": (1536, 768),
    "inner_model.u_net.d_blocks.3.2.qkv_proj.weight": (2304, 768, 1, 1),
    "inner_model.u_net.d_blocks.3.5.out_proj.weight": (768, 768, 1, 1),
    "inner_model.u_net.d_blocks.3.12.kv_proj.weight": (1536, 768),
    "inner_model.u_net.d_blocks.1.0.kernel": (4, 4),
    "inner_model.u_net.d_blocks.3.0.kernel": (4, 4),
    "inner_model.u_net.u_blocks.0.9.main.2.weight": (768, 768, 3, 3),
    "inner_model.u_net.u_blocks.0.10.qkv_proj.weight": (2304, 768, 1, 1),
    "inner_model.u_net.u_blocks.0.11.kv_proj.weight": (1536, 768),
    "inner_model.u_net.u_blocks.0.12.kernel": (4, 4),
    "inner_model.u_net.u_blocks.1.0.main.2.weight": (768, 1536, 3, 3),
    "inner_model.u_net.u_blocks.1.7.kv_proj.weight": (768, 768),
    "inner_model.u_net.u_blocks.1.8.kernel": (4, 4),
    "inner_model.u_net.u_blocks.2.8.kernel": (4, 4),
    "inner_model.u_net.u_blocks.3.0.main.2.weight": (384, 768, 3, 3),
    "inner_model.u_net.u_blocks.3.0.skip.weight": (384, 768, 1, 1),
    "inner_model.u_net.u_blocks.3.3.main.6.weight": (384, 384, 3, 3),
    "low_res_noise_embed.weight": (64, 1),
}


def test_full_size_kdiffusion_key_set():
    cfg = KUNetConfig.from_kdiffusion(KDIFFUSION_CONFIG)
    assert cfg == replace(KUNetConfig(), noise_aug_embed=True)
    with torch.device("meta"):
        sd = KUNet(cfg).state_dict()
    ext = {k: tuple(v.shape) for k, v in kunet_kdiffusion_keymap(cfg).to_ext(sd).items()}
    expected = original_key_shapes()
    assert set(ext) == set(expected), (sorted(set(ext) - set(expected))[:5], sorted(set(expected) - set(ext))[:5])
    assert ext == expected
    assert all(expected[k] == v for k, v in RELEASED_SHAPES.items())
    assert len(ext) == 566
    assert round(sum(torch.Size(s).numel() for s in ext.values()) / 1e6, 2) == 372.56
    assert sum(1 for k in ext if k in kdiffusion_kernels(cfg)) == 6
    assert kunet_config_from_shapes(ext, "kdiffusion") == cfg
    assert KUNetConfig.from_kdiffusion(KDIFFUSION_CONFIG["model"]) == cfg


def kdiffusion_dict(unet: KUNet) -> dict:
    """The original-format dict of a diffusers-loaded KUNet, plus noise-level weights (which diffusers lacks)."""
    cfg = replace(unet.cfg, noise_aug_embed=True)
    full = KUNet(cfg).eval()
    full.load_state_dict(unet.state_dict(), strict=False)  # keeps its random noise_aug_features
    return kunet_kdiffusion_keymap(cfg).to_ext(full.state_dict())


def test_round_trips_are_bit_exact():
    unet, cfg, ext = fixture_unet()
    # diffusers -> sdup -> diffusers
    km = kunet_diffusers_keymap(cfg)
    back = km.to_ext(km.to_sdup(ext))
    assert set(back) == set(ext) and all(torch.equal(back[k], ext[k]) for k in ext)
    # kdiffusion -> sdup -> kdiffusion (kernels included)
    original = kdiffusion_dict(unet)
    kcfg = kunet_config_from_shapes({k: v.shape for k, v in original.items()}, "kdiffusion", head_dim=8)
    assert kcfg == replace(cfg, noise_aug_embed=True)
    kkm = kunet_kdiffusion_keymap(kcfg)
    again = kkm.to_ext(kkm.to_sdup(original))
    assert set(again) == set(original) and all(torch.equal(again[k], original[k]) for k in original)
    for key, kernel in kdiffusion_kernels(kcfg).items():
        assert torch.equal(original[key], kernel)


def test_both_layouts_give_the_same_module():
    unet, cfg, _ = fixture_unet()
    original = kdiffusion_dict(unet)
    kcfg = replace(cfg, noise_aug_embed=True)
    from_original = KUNet(kcfg).eval()
    from_original.load_state_dict(kunet_kdiffusion_keymap(kcfg).to_sdup(original))
    a, b = unet.state_dict(), from_original.state_dict()
    assert set(b) - set(a) == {"noise_aug_features.weight"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    f = load_file(str(LU / "unet_forward.safetensors"))
    args = (f["in.sample"], f["in.timestep"], f["in.timestep_cond"], f["in.encoder_hidden_states"])
    assert torch.equal(unet(*args), from_original(*args))
    # kernels are optional on load but must hold the fixed values when present
    without_kernels = {k: v for k, v in original.items() if k not in kdiffusion_kernels(kcfg)}
    kunet_kdiffusion_keymap(kcfg).to_sdup(without_kernels)
    bad = dict(original)
    bad["inner_model.u_net.d_blocks.1.0.kernel"] = bad["inner_model.u_net.d_blocks.1.0.kernel"] * 2
    with pytest.raises(ValueError, match="kernel"):
        kunet_kdiffusion_keymap(kcfg).to_sdup(bad)


def test_noise_level_embedding():
    unet, cfg, _ = fixture_unet()
    zero = unet.noise_level_embedding(torch.zeros(2))  # what diffusers hard-codes: cos 0 / sin 0
    assert torch.equal(zero, torch.cat([torch.ones(2, 64), torch.zeros(2, 64)], 1))
    with pytest.raises(ValueError, match="low_res_noise_embed"):
        unet.noise_level_embedding(torch.tensor([0.0, 0.5]))
    original = kdiffusion_dict(unet)
    kcfg = replace(cfg, noise_aug_embed=True)
    full = KUNet(kcfg).eval()
    full.load_state_dict(kunet_kdiffusion_keymap(kcfg).to_sdup(original))
    s = torch.tensor([0.0, 0.5])
    w = original[NOISE_AUG_KEY]  # (64, 1)
    angles = 2 * torch.pi * torch.log1p(s)[:, None] @ w.T
    torch.testing.assert_close(full.noise_level_embedding(s), torch.cat([angles.cos(), angles.sin()], 1))
    low_res, pooled = torch.randn(2, 4, 3, 5), torch.randn(2, 32)
    unet_cond, mapping_cond = full.low_res_conditioning(low_res, s, pooled)
    assert unet_cond.shape == (2, 4, 6, 10) and mapping_cond.shape == (2, 160)
    torch.testing.assert_close(unet_cond[1, :, ::2, ::2], low_res[1] / (0.5 ** 2 + 1) ** 0.5)
    assert torch.equal(unet_cond[0, :, 1::2, 1::2], low_res[0]) and torch.equal(mapping_cond[:, 128:], pooled)


# ------------------------------------------------------------------------------------------------
# full-size diffusers manifest, configs, strictness

def test_manifest_maps_onto_full_size_kunet():
    shapes = manifest("diffusers_sd-x2-latent-upscaler.unet.json")
    assert len(shapes) == 639
    cfg = kunet_config_from_shapes(shapes, "diffusers")
    assert cfg == KUNetConfig()
    assert kunet_diffusers_keymap(cfg).shapes_to_sdup(shapes) == meta_shapes(cfg)  # strict: raises on any mismatch
    published = json.loads((MANIFESTS / "diffusers_configs.json").read_text())["configs"]
    assert kunet_config(published["stabilityai/sd-x2-latent-upscaler"]["unet"]) == cfg
    assert round(sum(torch.Size(s).numel() for s in shapes.values()) / 1e6, 2) == 372.56


def test_diffusers_config_round_trip():
    for cfg in (KUNetConfig(), kunet_config(TINY_DIFFUSERS)):
        assert kunet_config(kunet_diffusers_config(cfg)) == cfg


def test_unrepresentable_configs_are_refused():
    with pytest.raises(ValueError, match="cannot be expressed"):  # self-attention placement diffusers cannot express
        kunet_diffusers_config(replace(KUNetConfig(), self_attn_depths=(False, True, False, True)))
    with pytest.raises(ValueError, match="not representable"):  # deepest width != time-embedding width
        kunet_config({**TINY_DIFFUSERS, "block_out_channels": [32, 32, 64, 128]})
    with pytest.raises(ValueError, match="patch_size"):
        KUNetConfig.from_kdiffusion({**KDIFFUSION_CONFIG["model"], "patch_size": 2})
    with pytest.raises(ValueError, match="not a K-UNet"):
        kunet_config({**TINY_DIFFUSERS, "down_block_types": ["CrossAttnDownBlock2D"] * 4})


@pytest.mark.parametrize("layout", ["diffusers", "kdiffusion"])
def test_strict_unknown_and_missing_keys(layout):
    unet, cfg, ext = fixture_unet()
    if layout == "kdiffusion":
        ext, cfg = kdiffusion_dict(unet), replace(cfg, noise_aug_embed=True)
        km = kunet_kdiffusion_keymap(cfg)
        dropped = "inner_model.u_net.d_blocks.3.2.qkv_proj.weight"
    else:
        km = kunet_diffusers_keymap(cfg)
        dropped = "down_blocks.3.attentions.0.attn1.to_k.weight"
    with pytest.raises(KeyMismatch, match="bogus.weight") as e:
        km.to_sdup({**ext, "bogus.weight": torch.zeros(1)})
    assert e.value.unexpected == ["bogus.weight"] and not e.value.missing
    with pytest.raises(KeyMismatch, match=dropped.replace(".", r"\.")) as e:
        km.to_sdup({k: v for k, v in ext.items() if k != dropped})
    assert e.value.missing == [dropped] and not e.value.unexpected
