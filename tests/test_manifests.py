"""Every official checkpoint's key list (shared/manifests, copied to tests/data/manifests) must be
consumed completely by the full-size sdup model built on the meta device: each key onto a tensor of
exactly its shape, none left over, none missing; and detection must name the right family."""
import json

import pytest
import torch

from helpers import MANIFESTS
from sdup.checkpoints import CheckpointError, detect, read_shapes
from sdup.checkpoints.loader import inspect, load_state_dict

# manifest -> (family, layout, diffusers config repo or None, {component: million parameters} (the published counts))
ORIGINAL = {
    "sd-v1-4.json": ("sd1", {"unet": 859.52, "vae": 83.65}),
    "v2-1_512-ema-pruned.json": ("sd2", {}),
    "x4-upscaler-ema.json": ("x4", {"unet": 473.40, "vae": 55.33}),
    "stablesr_000117.json": ("stablesr", {"unet": 918.93, "struct_encoder": 52.49}),
    "vqgan_cfw_00011.json": ("stablesr_cfw_vae", {}),
    "vqgan_cfw_00011.model_state_dict.json": ("stablesr_cfw_vae", {}),
}
DIFFUSERS = {
    "diffusers_sd-v1-4.unet.json": ("sd1", "CompVis/stable-diffusion-v1-4", "unet"),
    "diffusers_sd-v1-4.vae.json": ("vae", "CompVis/stable-diffusion-v1-4", "vae"),
    "diffusers_sd-v1-4.text_encoder.json": ("sd1", "CompVis/stable-diffusion-v1-4", "text_encoder"),
    "diffusers_x4-upscaler.unet.json": ("x4", "stabilityai/stable-diffusion-x4-upscaler", "unet"),
    "diffusers_x4-upscaler.vae.json": ("vae", "stabilityai/stable-diffusion-x4-upscaler", "vae"),
    "diffusers_x4-upscaler.text_encoder.json": ("sd2", "stabilityai/stable-diffusion-x4-upscaler", "text_encoder"),
    "diffusers_sd-x2-latent-upscaler.unet.json": ("x2", "stabilityai/sd-x2-latent-upscaler", "unet"),
    "diffusers_sd-x2-latent-upscaler.vae.json": ("vae", "stabilityai/sd-x2-latent-upscaler", "vae"),
    "diffusers_sd-x2-latent-upscaler.text_encoder.json": ("sd1", "stabilityai/sd-x2-latent-upscaler", "text_encoder"),
}


def meta_tensors(shapes):
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def assert_consumed(model, shapes, expected_dropped=()):
    """The strict meta load already proved the mapping; check counts and shapes once more explicitly, and
    key by key: each key of the file is read by exactly one of the loader's maps or dropped for a stated
    reason; the maps name no key the file lacks and fill every tensor of the sdup modules, nothing more."""
    n_file = len(shapes)
    n_loaded = sum(v for k, v in model.report.items() if k not in ("dropped", "mismatch"))
    n_dropped = sum(model.report.get("dropped", {}).values())
    assert "mismatch" not in model.report
    assert n_loaded + n_dropped == n_file
    read = [k for km in model.keymaps.values() for e in km.entries for k in e.ext]
    dropped = [k for keys in model.dropped.values() for k in keys]
    assert len(read) == len(set(read)) and len(dropped) == len(set(dropped)) and not set(read) & set(dropped)
    assert set(read) | set(dropped) == set(shapes)
    filled = [k for km in model.keymaps.values() for e in km.entries for k in e.sdup]
    state = [f"{comp}.{k}" for comp, m in model.components().items() for k in m.state_dict()]
    assert sorted(filled) == sorted(state)


def test_every_manifest_is_covered_by_a_test():
    files = {p.name for p in MANIFESTS.glob("*.json")} - {"index.json", "diffusers_configs.json",
                                                           "sd-v1-4-full-ema.model_ema_keys.json"}
    assert files == set(ORIGINAL) | set(DIFFUSERS)


@pytest.mark.parametrize("name", list(ORIGINAL))
def test_original_manifest_loads_strictly(name):
    family, params = ORIGINAL[name]
    shapes, meta = read_shapes(MANIFESTS / name)
    assert detect(shapes, meta).family == family
    model = load_state_dict(meta_tensors(shapes), name=name, device="meta", dtype=None, strict=True)
    assert model.family == family
    assert_consumed(model, shapes)
    for comp, millions in params.items():
        n = sum(p.numel() for p in getattr(model, comp).parameters())
        assert round(n / 1e6, 2) == millions, (comp, n)
    # every loaded tensor has the manifest's shape after remapping (load_state_dict checked sdup-side shapes)
    for comp, module in model.components().items():
        assert all(t.device.type == "meta" for t in module.state_dict().values())


def test_cfw_manifest_drops_exactly_the_training_losses():
    shapes, _ = read_shapes(MANIFESTS / "vqgan_cfw_00011.json")
    model = load_state_dict(meta_tensors(shapes), name="cfw", device="meta", dtype=None)
    losses = [k for k in shapes if k.startswith("loss.")]
    assert len(losses) == 56
    assert sum(model.report["dropped"].values()) == len(losses)


def test_full_ema_manifest_swaps_in_the_ema_weights():
    shapes, _ = read_shapes(MANIFESTS / "sd-v1-4.json")
    ema, _ = read_shapes(MANIFESTS / "sd-v1-4-full-ema.model_ema_keys.json")
    both = {**shapes, **ema}
    assert detect(both).family == "sd1"
    plain = load_state_dict(meta_tensors(both), name="full-ema", device="meta", dtype=None)
    assert any("not selected" in r for r in plain.report["dropped"])
    used = load_state_dict(meta_tensors(both), name="full-ema", device="meta", dtype=None, ema=True)
    assert any("swapped" in r for r in used.report["dropped"])
    assert_consumed(plain, both)
    assert_consumed(used, both)
    assert {k for e in used.keymaps["unet"].entries for k in e.ext} == set(ema) - {"model_ema.decay", "model_ema.num_updates"}
    n_ema = len([k for k in ema if k not in ("model_ema.decay", "model_ema.num_updates")])
    assert n_ema == plain.report["unet"] == 686


@pytest.mark.parametrize("drop", ["model_ema.diffusion_modelout2bias", "model_ema.diffusion_modelinput_blocks00weight"])
def test_partial_ema_set_is_an_error(drop):
    shapes, _ = read_shapes(MANIFESTS / "sd-v1-4.json")
    ema, _ = read_shapes(MANIFESTS / "sd-v1-4-full-ema.model_ema_keys.json")
    ema.pop(drop)
    ema["model_ema.diffusion_modelextraweight"] = (3,)
    with pytest.raises(CheckpointError) as e:
        load_state_dict(meta_tensors({**shapes, **ema}), name="partial", device="meta", dtype=None, ema=True)
    msg = str(e.value)
    assert "\n" not in msg and "686 model_ema.* weights in the file" in msg and f"1 of the 686 UNet weights have none (e.g. {drop})" in msg
    assert "1 match no UNet weight (e.g. model_ema.diffusion_modelextraweight)" in msg
    # without ema=True the (unused) EMA set is only reported as dropped
    plain = load_state_dict(meta_tensors({**shapes, **ema}), name="partial", device="meta", dtype=None)
    assert any("not selected" in r for r in plain.report["dropped"])


def test_reshape_error_names_the_keys_and_shapes():
    shapes, _ = read_shapes(MANIFESTS / "sd-v1-4.json")
    shapes["model.diffusion_model.input_blocks.1.1.proj_in.weight"] = (320, 320, 3, 3)  # SD1 stores a 1x1 conv
    with pytest.raises(ValueError) as e:
        load_state_dict(meta_tensors(shapes), name="sd1", device="meta", dtype=None)
    assert str(e.value) == ("unet (model.diffusion_model.*): input_blocks.1.1.proj_in.weight (320, 320, 3, 3) -> "
                            "down.0.attn.0.proj_in.weight (conv1x1): expected shape (320, 320, 1, 1), got (320, 320, 3, 3)")


@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_diffusers_manifest_loads_strictly(name):
    family, repo, comp = DIFFUSERS[name]
    shapes, meta = read_shapes(MANIFESTS / name)
    det = detect(shapes, meta)
    assert (det.family, det.layout, det.component) == (family, "diffusers", comp)
    cfg = json.loads((MANIFESTS / "diffusers_configs.json").read_text())["configs"][repo][comp]
    for component_config in (cfg, None):  # with its config.json, and from the shapes alone
        model = load_state_dict(meta_tensors(shapes), name=name, device="meta", dtype=None, strict=True,
                                component_config=component_config)
        assert getattr(model, comp) is not None
        assert_consumed(model, shapes)


@pytest.mark.parametrize("name", ["sd-v1-4.json", "diffusers_x4-upscaler.unet.json"])
def test_inspect_reports_clean_coverage(name):
    det, model, error = inspect(MANIFESTS / name)
    assert error is None and "mismatch" not in model.report


def test_inspect_lists_missing_and_unexpected():
    shapes, _ = read_shapes(MANIFESTS / "x4-upscaler-ema.json")
    shapes.pop("model.diffusion_model.out.2.bias")
    shapes["model.diffusion_model.extra.weight"] = (3,)
    model = load_state_dict(meta_tensors(shapes), name="x", device="meta", dtype=None, strict=False)
    mm = model.report["mismatch"]["unet (model.diffusion_model.*)"]
    assert mm == {"missing": ["out.2.bias"], "unexpected": ["extra.weight"]}


CONFIGS = {"sd-v1-4.json": "sd1-inference.yaml", "v2-1_512-ema-pruned.json": "sd2-inference.yaml",
           "x4-upscaler-ema.json": "x4-upscaling.yaml"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shipped_yaml_configs_agree_with_shape_inference(name):
    from pathlib import Path
    cfg_path = Path(__file__).parents[1] / "configs" / CONFIGS[name]
    shapes, _ = read_shapes(MANIFESTS / name)
    inferred = load_state_dict(meta_tensors(shapes), name=name, device="meta", dtype=None)
    from_yaml = load_state_dict(meta_tensors(shapes), name=name, device="meta", dtype=None, config=cfg_path)
    for comp, m in inferred.components().items():
        a, b = m.state_dict(), getattr(from_yaml, comp).state_dict()
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    ua, ub = inferred.configs["unet"], from_yaml.configs["unet"]
    widths = {ua.model_channels * m for m in ua.channel_mult}
    assert all(ua.heads_for(c) == ub.heads_for(c) for c in widths)
    assert inferred.configs["text_encoder"] == from_yaml.configs["text_encoder"]
    assert (inferred.prediction, inferred.scale_factor, inferred.schedule) == \
           (from_yaml.prediction, from_yaml.scale_factor, from_yaml.schedule)
