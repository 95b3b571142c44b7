"""Text encoders, tokenizer and their key maps (fixtures in tests/data, copied from the shared fixture set)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import assert_parity
from sdup.checkpoints.hf_clip import (HF_CLIP_IGNORABLE, hf_clip_ignorable, hf_clip_keymap, openclip_ignorable,
                                      openclip_keymap)
from sdup.checkpoints.keymap import KeyMismatch
from sdup.models.text import (CLIP_VIT_L14, KNOWN_TEXT_CONFIGS, OPENCLIP_VIT_H14, TINY_CLIP, TINY_OPENCLIP,
                              TextConfig, TextEncoder, Tokenizer, text_config_from_shapes)

DATA = Path(__file__).parent / "data"
FIX = DATA / "fixtures"
CKPT_PREFIX = {"sd1": "cond_stage_model.transformer.", "x4": "cond_stage_model.model.",
               "stablesr": "cond_stage_model.model."}


def text_weights(family: str) -> dict:
    """The text-tower tensors of a fixture model.ckpt, prefix stripped (original-format names)."""
    sd = torch.load(FIX / family / "model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    p = CKPT_PREFIX[family]
    return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}


def encoder_from(cfg: TextConfig, ext: dict, layout: str) -> TextEncoder:
    if layout == "hf":
        sd = hf_clip_keymap(cfg).to_sdup(ext, ignore=HF_CLIP_IGNORABLE.__contains__)
    else:
        sd = openclip_keymap(cfg).to_sdup(ext, ignore=openclip_ignorable(cfg).__contains__)
    model = TextEncoder(cfg).eval()
    model.load_state_dict(sd, strict=True)
    return model


# ------------------------------------------------------------------------------------------------ fixtures

CASES = [  # family, config, weights source, layout
    ("sd1", TINY_CLIP, "ckpt", "hf"),
    ("sd1", TINY_CLIP, "diffusers", "hf"),
    ("x4", TINY_OPENCLIP, "ckpt", "openclip"),
    ("x4", TINY_OPENCLIP, "diffusers", "hf"),  # OpenCLIP converted to a 2-layer gelu CLIPTextModel
    ("stablesr", TINY_OPENCLIP, "ckpt", "openclip"),
    ("latent_upscaler", TINY_CLIP, "diffusers", "hf"),
]


@pytest.mark.parametrize("family,cfg,source,layout", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_fixture_parity(family, cfg, source, layout):
    ext = text_weights(family) if source == "ckpt" else load_file(FIX / family / "diffusers/text_encoder/model.safetensors")
    model = encoder_from(cfg, ext, layout)
    fx = load_file(FIX / family / "text_encoder.safetensors")
    with torch.no_grad():
        out = model(fx["in.input_ids"])
    errs = {"context": assert_parity(out.context, fx["out.last_hidden_state"])}
    if family == "latent_upscaler":  # x2: pre-LN hidden states + pooled
        errs["hidden_pre_ln"] = assert_parity(out.hidden_pre_ln, fx["out.prompt_embeds"])
        errs["pooled"] = assert_parity(out.pooled, fx["out.pooled"])
    print(family, source, errs)


def test_known_configs_match_fixture_yaml_names():
    assert KNOWN_TEXT_CONFIGS["sdup-tiny-clip-text"] is TINY_CLIP
    assert KNOWN_TEXT_CONFIGS["sdup-tiny-openclip"] is TINY_OPENCLIP
    for fam, name in (("sd1", "version: sdup-tiny-clip-text"), ("x4", "arch: sdup-tiny-openclip"),
                      ("stablesr", "arch: sdup-tiny-openclip")):
        assert name in (FIX / fam / "config.yaml").read_text()


def test_config_from_shapes():
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}
    assert text_config_from_shapes(shapes(text_weights("sd1")), "hf", heads=2) == TINY_CLIP
    assert text_config_from_shapes(shapes(text_weights("x4")), "openclip", heads=2) == TINY_OPENCLIP
    x4_hf = load_file(FIX / "x4/diffusers/text_encoder/model.safetensors")
    cfg = text_config_from_shapes(shapes(x4_hf), "hf", heads=2, act="gelu", output="penultimate", pad_token_id=0)
    assert cfg == TINY_OPENCLIP
    for name, ref in (("sd-v1-4", CLIP_VIT_L14), ("x4-upscaler", OPENCLIP_VIT_H14)):
        manifest = {k: v[0] for k, v in json.loads((DATA / f"manifests/diffusers_{name}.text_encoder.json").read_text()).items()}
        over = {} if ref is CLIP_VIT_L14 else dict(act="gelu", output="penultimate", pad_token_id=0)
        assert text_config_from_shapes(manifest, "hf", **over) == ref
    with pytest.raises(ValueError):
        text_config_from_shapes(shapes(text_weights("sd1")), "hf")  # width 32: heads can't be width // 64


# ------------------------------------------------------------------------------------------------ transformers

@pytest.mark.parametrize("act,layers", [("quick_gelu", 2), ("gelu", 3)])
def test_parity_with_transformers(act, layers):
    from transformers import CLIPTextConfig, CLIPTextModel

    V, W, H, M = 300, 64, 4, 160
    hf_cfg = CLIPTextConfig(vocab_size=V, hidden_size=W, intermediate_size=M, num_hidden_layers=layers,
                            num_attention_heads=H, hidden_act=act, max_position_embeddings=77,
                            pad_token_id=V - 1, bos_token_id=V - 2, eos_token_id=V - 1)
    torch.manual_seed(0)
    ref = CLIPTextModel(hf_cfg).eval()
    with torch.no_grad():  # no trivially-initialised tensor (LayerNorms, biases)
        for name, p in ref.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name and name.endswith("weight") else 0.1 * torch.randn_like(p))
    hf_sd = {"text_model." + k: v for k, v in ref.state_dict().items()}  # transformers 5: no text_model. prefix

    cfg = TextConfig(vocab_size=V, width=W, layers=layers, heads=H, mlp_width=M, act=act,
                     pad_token_id=V - 1, bos_token_id=V - 2, eos_token_id=V - 1)
    model = encoder_from(cfg, hf_sd, "hf")

    ids = torch.full((3, 77), V - 1)  # pad = eos; eos at positions 5, 40, 76
    for row, n in enumerate((4, 39, 75)):
        ids[row, 0] = V - 2
        ids[row, 1:n + 1] = torch.randint(0, V - 2, (n,))
    with torch.no_grad():
        o = ref(input_ids=ids, output_hidden_states=True)
        out = model(ids)
    assert_parity(out.context, o.last_hidden_state)
    assert_parity(out.hidden_pre_ln, o.hidden_states[-1])
    assert_parity(out.pooled, o.pooler_output)
    # batch independence: row by row equals the batch
    with torch.no_grad():
        single = torch.cat([model(ids[i:i + 1]).context for i in range(3)])
    assert_parity(single, out.context, 1e-6, "row by row vs batch")


# ------------------------------------------------------------------------------------------------ tokenizer

def test_tokenizer_conventions():
    fx = load_file(FIX / "tokenizer/tokenizer.safetensors")
    prompts = json.loads((FIX / "tokenizer/meta.json").read_text())["prompts"]
    assert len(prompts) == 6
    sd1, openclip = Tokenizer.for_config(CLIP_VIT_L14), Tokenizer.for_config(OPENCLIP_VIT_H14)
    assert (sd1.pad_token_id, openclip.pad_token_id) == (49407, 0)
    assert torch.equal(sd1(prompts), fx["out.sd1_input_ids"])
    assert torch.equal(openclip(prompts), fx["out.openclip_input_ids"])
    assert torch.equal(Tokenizer(pad_token_id=0)(prompts[0]), fx["out.openclip_input_ids"][:1])
    with pytest.raises(ValueError):
        Tokenizer.for_config(TINY_CLIP)


# ------------------------------------------------------------------------------------------------ key maps

@pytest.mark.parametrize("source,cfg", [("sd1-ckpt", TINY_CLIP), ("x4-diffusers", TINY_OPENCLIP)])
def test_round_trip_hf(source, cfg):
    ext = text_weights("sd1") if source == "sd1-ckpt" else load_file(FIX / "x4/diffusers/text_encoder/model.safetensors")
    km = hf_clip_keymap(cfg)
    back = km.to_ext(km.to_sdup(ext, ignore=HF_CLIP_IGNORABLE.__contains__))
    expected = {k: v for k, v in ext.items() if k not in HF_CLIP_IGNORABLE}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)


def test_round_trip_openclip():
    ext = text_weights("x4")
    km = openclip_keymap(TINY_OPENCLIP)
    ignore = openclip_ignorable(TINY_OPENCLIP)
    assert ignore == {"text_projection", "logit_scale"} | {k for k in ext if k.startswith("transformer.resblocks.2.")}
    back = km.to_ext(km.to_sdup(ext, ignore=ignore.__contains__))
    expected = {k: v for k, v in ext.items() if k not in ignore}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], expected[k]) for k in expected)


def test_fused_qkv_order():
    ext = text_weights("sd1")
    sd = hf_clip_keymap(TINY_CLIP).to_sdup(ext, ignore=HF_CLIP_IGNORABLE.__contains__)
    w = sd["transformer.resblocks.1.attn.in_proj_weight"]
    for i, p in enumerate("qkv"):
        assert torch.equal(w[32 * i:32 * (i + 1)], ext[f"text_model.encoder.layers.1.self_attn.{p}_proj.weight"])


def test_strictness():
    ext = text_weights("sd1")
    km = hf_clip_keymap(TINY_CLIP)
    ign = HF_CLIP_IGNORABLE.__contains__
    with pytest.raises(KeyMismatch, match="unexpected: text_model.encoder.layers.2.mlp.fc1.weight"):
        km.to_sdup({**ext, "text_model.encoder.layers.2.mlp.fc1.weight": torch.zeros(1)}, ignore=ign)
    missing = dict(ext)
    del missing["text_model.encoder.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(KeyMismatch, match="missing: text_model.encoder.layers.0.self_attn.k_proj.bias"):
        km.to_sdup(missing, ignore=ign)
    # position_ids is optional (files re-saved by transformers >= 5 lack it)
    km.to_sdup({k: v for k, v in ext.items() if not k.endswith("position_ids")})

    oc = text_weights("x4")
    km, ign = openclip_keymap(TINY_OPENCLIP), openclip_ignorable(TINY_OPENCLIP).__contains__
    with pytest.raises(KeyMismatch, match="unexpected: transformer.resblocks.3.ln_1.weight"):
        km.to_sdup({**oc, "transformer.resblocks.3.ln_1.weight": torch.zeros(1)}, ignore=ign)
    with pytest.raises(KeyMismatch, match="unexpected: transformer.resblocks.2.extra"):
        km.to_sdup({**oc, "transformer.resblocks.2.extra": torch.zeros(1)}, ignore=ign)
    with pytest.raises(KeyMismatch, match="missing: ln_final.bias"):
        km.to_sdup({k: v for k, v in oc.items() if k != "ln_final.bias"}, ignore=ign)


def test_prefixed_maps():
    sd = torch.load(FIX / "x4/model.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    p = "cond_stage_model.model."
    km = openclip_keymap(TINY_OPENCLIP).with_prefix("text_encoder.", p)
    ign = openclip_ignorable(TINY_OPENCLIP, prefix=p)
    out = km.to_sdup(sd, ignore=lambda k: k in ign or not k.startswith(p))
    assert set(out) == {"text_encoder." + k for k in TextEncoder(TINY_OPENCLIP).state_dict()}
    assert hf_clip_ignorable("cond_stage_model.transformer.") == {
        "cond_stage_model.transformer.text_model.embeddings.position_ids"}


@pytest.mark.parametrize("name,cfg", [("sd-v1-4", CLIP_VIT_L14), ("x4-upscaler", OPENCLIP_VIT_H14)])
def test_full_size_manifest_on_meta(name, cfg):
    manifest = json.loads((DATA / f"manifests/diffusers_{name}.text_encoder.json").read_text())
    shapes = hf_clip_keymap(cfg).shapes_to_sdup({k: v[0] for k, v in manifest.items()},
                                                ignore=HF_CLIP_IGNORABLE.__contains__)
    with torch.device("meta"):
        model = TextEncoder(cfg)
    assert shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(model.transformer.resblocks) == (12 if cfg is CLIP_VIT_L14 else 23)
