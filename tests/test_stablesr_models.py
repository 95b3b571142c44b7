"""StableSR model parts: SFT UNet, time-aware encoder and CFW autoencoder against the upstream fixtures
(tests/data/fixtures/stablesr), key tables against the official manifests, round trips, strictness."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from helpers import FIXTURES, MANIFESTS, assert_parity
from sdup.checkpoints import ldm
from sdup.checkpoints.io import read_state_dict
from sdup.checkpoints.keymap import KeyMismatch
from sdup.checkpoints.ldm import (CFW_IGNORABLE, STRUCT_PREFIX, cfw_config_from_shapes, cfw_fusion_from_keys,
                                           cfw_vae_keymap, sft_feature_channels_from_shapes,
                                           struct_encoder_config_from_shapes, struct_encoder_keymap)
from sdup.models.stablesr import (SFT, CFWAutoencoder, CFWConfig, TimeAwareEncoder, TimeAwareEncoderConfig,
                                  add_sft_layers, remove_sft_layers)
from sdup.models.unet import UNet, UNetConfig
from sdup.models.vae import AutoencoderKL, VAEConfig
from sdup.nn import use_attention_backend

pytestmark = pytest.mark.usefixtures("no_grad")  # forward-only tests (conftest.py)

SSR = FIXTURES / "stablesr"


def yaml_params(name="config.yaml"):
    return OmegaConf.to_container(OmegaConf.load(SSR / name))["model"]["params"]


def ckpt_parts():
    return ldm.split_components(read_state_dict(SSR / "model.ckpt"))


def sft_unet():
    cfg = UNetConfig.from_ldm(yaml_params()["unet_config"]["params"])
    parts = ckpt_parts()
    unet = add_sft_layers(UNet(cfg), sft_feature_channels_from_shapes(parts["unet"])).eval()
    km = ldm.unet_keymap(cfg, unet.state_dict())
    unet.load_state_dict(km.to_sdup(parts["unet"]))
    return unet, km, parts["unet"]


def struct_encoder():
    cfg = TimeAwareEncoderConfig.from_ldm(yaml_params()["structcond_stage_config"]["params"])
    enc = TimeAwareEncoder(cfg).eval()
    km = struct_encoder_keymap(cfg, enc.state_dict())
    ext = ckpt_parts()["struct_encoder"]
    enc.load_state_dict(km.to_sdup(ext))
    return enc, km, ext


def cfw_vae():
    cfg = CFWConfig.from_ldm(yaml_params("cfw_vae_config.yaml"))
    vae = CFWAutoencoder(cfg).eval()
    km = cfw_vae_keymap(cfg, vae.state_dict())
    ext = read_state_dict(SSR / "cfw_vae.ckpt")
    vae.load_state_dict(km.to_sdup(ext, ignore=CFW_IGNORABLE))
    return vae, km, ext


def struct_cond(d, prefix):
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


# --- numerical parity with the upstream fixtures ---

@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("key_type", [str, int])
def test_sft_unet_matches_upstream(backend, key_type):
    unet, _, _ = sft_unet()
    d = load_file(SSR / "unet_forward.safetensors")
    feats = {key_type(w): v for w, v in struct_cond(d, "in.struct_cond.").items()}  # widths "24", "12"
    with use_attention_backend(backend):
        out = unet(d["in.x"], d["in.timesteps"], d["in.context"], features=feats)
    assert_parity(out, d["out.model_output"], what=f"StableSR UNet ({backend})")


@pytest.mark.parametrize("backend", ["sdpa", "math", "chunked"])
def test_time_aware_encoder_matches_upstream(backend):
    enc, _, _ = struct_encoder()
    d = load_file(SSR / "time_aware_encoder.safetensors")
    ref = struct_cond(d, "out.feat.")
    with use_attention_backend(backend, chunk_size=50):
        out = enc(d["in.lr_latent"], d["in.timesteps"])
    assert sorted(out) == sorted(int(w) for w in ref) == [12, 24]
    for w, r in ref.items():
        assert_parity(out[int(w)], r, what=f"time-aware encoder width {w} ({backend})")


def test_encoder_features_drive_the_unet():
    """The encoder's output dict plugs straight into the SFT UNet (int keys, every width present)."""
    unet, enc = sft_unet()[0], struct_encoder()[0]
    d = load_file(SSR / "time_aware_encoder.safetensors")
    x = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    out = unet(x, d["in.timesteps"], ctx, features=enc(d["in.lr_latent"], d["in.timesteps"]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_cfw_vae_matches_upstream():
    vae, _, _ = cfw_vae()
    d = load_file(SSR / "cfw_vae.safetensors")
    post, enc_fea = vae.encode(d["in.image"])
    assert_parity(post.mean, d["out.posterior_mean"], what="CFW posterior mean")
    assert_parity(post.std, d["out.posterior_std"], what="CFW posterior std")
    assert len(enc_fea) == 2
    for i, f in enumerate(enc_fea):
        assert_parity(f, d[f"out.enc_fea.{i}"], what=f"CFW enc_fea.{i}")
    for w in ("0.0", "0.5", "1.0"):
        assert_parity(vae.decode(d["in.z"], enc_fea, float(w)), d[f"out.decode_w{w}"], what=f"CFW decode w={w}")
    # default w comes from the config (fusion_w 1.0 in the YAML)
    assert torch.equal(vae.decode(d["in.z"], enc_fea), vae.decode(d["in.z"], enc_fea, 1.0))


def test_cfw_tiled_decode_matches_upstream():
    """The exact tiled decode runs the CFW decoder through the same stages (the fusion layers as level hooks, their
    encoder features cut to the tiles): the untiled result and the upstream fixture, on 3 x 4 latent tiles."""
    from sdup.tiling import tiled_decode
    vae, _, _ = cfw_vae()
    d = load_file(SSR / "cfw_vae.safetensors")
    enc_fea = [d["out.enc_fea.0"], d["out.enc_fea.1"]]
    for w in (0.5, 1.0):
        info = {}
        out = tiled_decode(vae, d["in.z"], tile=(3, 4), overlap=1, fuse_inputs=vae.fuse_inputs(enc_fea, w), info=info)
        assert info["tiles"] == 9
        assert_parity(out, vae.decode(d["in.z"], enc_fea, w), what=f"tiled vs untiled CFW decode w={w}")
        assert_parity(out, d[f"out.decode_w{w}"], what=f"tiled CFW decode w={w}")
    with pytest.raises(ValueError, match="hook input"):
        tiled_decode(vae, d["in.z"][..., :4, :], tile=2, overlap=1, fuse_inputs=vae.fuse_inputs(enc_fea, 0.5))


def test_cfw_w0_is_exactly_the_plain_decoder():
    vae, _, ext = cfw_vae()
    d = load_file(SSR / "cfw_vae.safetensors")
    _, enc_fea = vae.encode(d["in.image"])
    plain_cfg = VAEConfig(**{f: getattr(vae.cfg, f) for f in VAEConfig.__dataclass_fields__})
    plain = AutoencoderKL(plain_cfg).eval()
    sd = {k: v for k, v in vae.state_dict().items() if ".fuse." not in k}
    plain.load_state_dict(sd)
    ref = plain.decode(d["in.z"])
    assert torch.equal(vae.decode(d["in.z"], enc_fea, 0.0), ref)
    assert torch.equal(vae.decode(d["in.z"]), ref)             # no features: the SD decoder
    assert torch.equal(vae.decode(d["in.z"], None, 0), ref)
    with pytest.raises(ValueError, match="enc_features"):
        vae.decode(d["in.z"], None, 0.5)
    # the plain VAE posterior equals the CFW one (same encoder)
    assert torch.equal(plain.encode(d["in.image"]).mean, vae.encode(d["in.image"])[0].mean)


def test_plain_unet_unchanged_without_sft():
    """No SFT attached: features are ignored, the state dict has no hook keys, and attaching then removing
    the layers gives back the same network."""
    cfg = UNetConfig.from_ldm(yaml_params()["unet_config"]["params"])
    plain = UNet(cfg).eval()
    assert not any("feature_mod" in k for k in plain.state_dict())
    km = ldm.unet_keymap(cfg, plain.state_dict())
    plain.load_state_dict(km.to_sdup(ckpt_parts()["unet"], ignore=lambda k: ".spade." in k))
    d = load_file(SSR / "unet_forward.safetensors")
    args = (d["in.x"], d["in.timesteps"], d["in.context"])
    ref = plain(*args)
    assert torch.equal(plain(*args, features=struct_cond(d, "in.struct_cond.")), ref)
    assert torch.equal(plain(*args, features=None), ref)
    add_sft_layers(plain, 32)
    assert sum(isinstance(m, SFT) for m in plain.modules()) == len(list(plain.res_blocks())) == 2 * 1 + 2 + 2 * 2  # levels x L, mid, levels x (L+1)
    assert not torch.equal(plain(*args, features=struct_cond(d, "in.struct_cond.")), ref)
    remove_sft_layers(plain)
    assert torch.equal(plain(*args), ref)
    assert set(plain.state_dict()) == set(UNet(cfg).state_dict())


def test_sft_unet_needs_every_width():
    unet, _, _ = sft_unet()
    d = load_file(SSR / "unet_forward.safetensors")
    args = (d["in.x"], d["in.timesteps"], d["in.context"])
    with pytest.raises(ValueError, match="no feature map"):
        unet(*args)
    with pytest.raises(ValueError, match="width 12"):
        unet(*args, features={"24": d["in.struct_cond.24"]})


# --- key tables: official manifests, full size on the meta device ---

def manifest(name):
    return {k: tuple(v[0]) for k, v in json.loads((MANIFESTS / name).read_text()).items()}


def official_unet_cfg():  # StableSR's UNet: the SD 2.1-base UNet
    return UNetConfig(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                      attention_resolutions=(4, 2, 1), num_head_channels=64, use_linear_in_transformer=True,
                      context_dim=1024, transformer_depth=1)


def assert_shapes(module, km, ext_shapes, **kw):
    got = km.shapes_to_sdup(ext_shapes, **kw)  # strict: raises KeyMismatch on any missing / unexpected key
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert got == want


def millions(module):
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)


def test_stablesr_manifest_maps_fully():
    parts = ldm.split_components(manifest("stablesr_000117.json"))
    assert len(parts["unet"]) == 862 and len(parts["struct_encoder"]) == 200
    with torch.device("meta"):
        ucfg = official_unet_cfg()
        unet = add_sft_layers(UNet(ucfg), 256)
        scfg = TimeAwareEncoderConfig()  # defaults = v2-finetune_text_T_512.yaml structcond_stage_config
        enc = TimeAwareEncoder(scfg)
    assert sft_feature_channels_from_shapes(parts["unet"]) == 256
    assert_shapes(unet, ldm.unet_keymap(ucfg, unet.state_dict()), parts["unet"])
    assert_shapes(enc, struct_encoder_keymap(scfg, enc.state_dict()), parts["struct_encoder"])
    assert millions(unet) == 918.93 and millions(enc) == 52.49  # the official checkpoint (manifest)
    inferred = struct_encoder_config_from_shapes(parts["struct_encoder"])
    assert set(inferred.attention_resolutions) == {1, 2, 4}
    assert inferred == TimeAwareEncoderConfig(attention_resolutions=inferred.attention_resolutions)
    # the prefixed names work too
    assert struct_encoder_config_from_shapes({STRUCT_PREFIX + k: v for k, v in parts["struct_encoder"].items()}) == inferred


@pytest.mark.parametrize("name,n_loss", [("vqgan_cfw_00011.json", 56), ("vqgan_cfw_00011.model_state_dict.json", 0)])
def test_cfw_manifest_maps_fully(name, n_loss):
    shapes = manifest(name)
    assert sum(CFW_IGNORABLE(k) for k in shapes) == n_loss
    assert all(k.startswith("loss.") for k in shapes if CFW_IGNORABLE(k))
    cfg = cfw_config_from_shapes(shapes)
    assert cfg == CFWConfig()  # ch 128, [1,2,4,4], 2 res blocks, 2 RRDBs per fusion layer
    assert cfw_fusion_from_keys(shapes) == ([1, 2], 2)
    with torch.device("meta"):
        vae = CFWAutoencoder(cfg)
    km = cfw_vae_keymap(cfg, vae.state_dict())
    assert_shapes(vae, km, shapes, ignore=CFW_IGNORABLE)
    assert km.ext_keys() == {k for k in shapes if not k.startswith("loss.")}
    if n_loss:
        with pytest.raises(KeyMismatch, match="56 unexpected"):
            km.shapes_to_sdup(shapes)  # without the ignore rule the loss keys are unexpected
    assert millions(vae.decoder) == 93.88  # the official checkpoint (manifest)
    fusion = [k for k in shapes if ".fusion_layer_" in k]
    assert len(fusion) == 156 and len(shapes) - n_loss - len(fusion) == 248
    # fusion_layer_2 = 512 channels at H/4 = sdup decoder level 1; fusion_layer_1 = 256 channels = level 2
    assert vae.decoder.up[1].fuse.fuse_out.conv2.weight.shape[0] == 512
    assert vae.decoder.up[2].fuse.fuse_out.conv2.weight.shape[0] == 256
    assert vae.decoder.up[0].fuse is None and vae.decoder.up[3].fuse is None


# --- configs, round trips, strictness ---

def test_configs_from_yaml_and_shapes_agree():
    p = yaml_params()
    parts = ckpt_parts()
    scfg = TimeAwareEncoderConfig.from_ldm(p["structcond_stage_config"]["params"])
    assert scfg == TimeAwareEncoderConfig(model_channels=32, out_channels=32, num_res_blocks=1,
                                          attention_resolutions=(1, 2), channel_mult=(1, 1), num_heads=4)
    inferred = struct_encoder_config_from_shapes({k: v.shape for k, v in parts["struct_encoder"].items()})
    assert inferred == scfg
    ccfg = CFWConfig.from_ldm(yaml_params("cfw_vae_config.yaml"))
    assert (ccfg.num_fuse_block, ccfg.fusion_w, ccfg.ch_mult, ccfg.fusion_levels()) == (1, 1.0, (1, 1, 1), [1])
    assert cfw_config_from_shapes({k: v.shape for k, v in read_state_dict(SSR / "cfw_vae.ckpt").items()}) == ccfg
    for bad in ({"use_new_attention_order": True}, {"resblock_updown": True}, {"use_scale_shift_norm": True}):
        with pytest.raises(ValueError):
            TimeAwareEncoderConfig.from_ldm(dict(p["structcond_stage_config"]["params"], **bad))


@pytest.mark.parametrize("build", [struct_encoder, cfw_vae, sft_unet])
def test_round_trip_is_bit_exact(build):
    module, km, ext = build()
    back = km.to_ext(module.state_dict())
    expected = {k: v for k, v in ext.items() if not CFW_IGNORABLE(k)}
    assert set(back) == set(expected)
    assert all(back[k].shape == v.shape and torch.equal(back[k], v) for k, v in expected.items())


def test_struct_encoder_conv1d_weights():
    enc, km, ext = struct_encoder()
    sd = enc.state_dict()
    assert ext["input_blocks.1.1.qkv.weight"].shape == (96, 32, 1)
    assert sd["levels.0.attn.0.qkv.weight"].shape == (96, 32)
    assert torch.equal(sd["levels.0.attn.0.qkv.weight"], ext["input_blocks.1.1.qkv.weight"][..., 0])
    assert torch.equal(sd["mid.attn.out_proj.weight"], ext["middle_block.1.proj_out.weight"][..., 0])
    assert torch.equal(sd["feature_proj.1.conv2.weight"], ext["fea_tran.1.out_layers.3.weight"])


@pytest.mark.parametrize("build,extra", [(struct_encoder, "input_blocks.9.0.op.weight"),
                                         (cfw_vae, "decoder.fusion_layer_2.encode_enc_1.norm1.weight"),
                                         (sft_unet, "input_blocks.1.0.spade.extra.weight")])
def test_unknown_or_missing_key_raises(build, extra):
    _, km, ext = build()
    with pytest.raises(KeyMismatch, match=extra.replace(".", r"\.")):
        km.to_sdup(dict(ext, **{extra: torch.zeros(1)}), ignore=CFW_IGNORABLE)
    missing = dict(ext)
    gone = sorted(k for k in missing if not CFW_IGNORABLE(k))[0]
    missing.pop(gone)
    with pytest.raises(KeyMismatch, match=gone.replace(".", r"\.")):
        km.to_sdup(missing, ignore=CFW_IGNORABLE)
