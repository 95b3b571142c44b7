"""Loading diffusers folders (``unet/``, ``vae/``, ``text_encoder/``, or a bare VAE folder) and single diffusers
component files; the key tables are in ``diffusers.py``."""
from __future__ import annotations

import json
from pathlib import Path

from ..models.unet import UNet
from ..models.vae import AutoencoderKL
from . import diffusers as dfs
from .build import FAMILY_DEFAULTS, Build, LoadedModel, meta_keys, shapes_of, tokenizer_for
from .detect import unet_config_from_diffusers_shapes, vae_config_from_diffusers_shapes
from .io import CheckpointError, component_config, component_file, is_diffusers_folder, is_vae_folder, read_state_dict

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "sample"}  # scheduler config -> sdup


def hf_text_config(shapes: dict, family: str, cfg_json: dict | None):
    """diffusers ``text_encoder/``: sizes from the weights, heads and activation from config.json; SD2-family
    encoders (OpenCLIP-H with its last block already dropped) keep the penultimate / pad-0 conventions,
    so all their HF layers are built and the original layout gets one (unused) block more."""
    from ..models.text import text_config_from_shapes
    cfg_json = cfg_json or {}
    over = {}
    if family in ("sd2", "x4", "stablesr"):
        over = dict(act="gelu", output="penultimate", pad_token_id=0)
    if "hidden_act" in cfg_json:
        over["act"] = cfg_json["hidden_act"]
    return text_config_from_shapes(shapes, "hf", heads=cfg_json.get("num_attention_heads"), **over)


def diffusers_family(folder: Path) -> str:
    index = folder / "model_index.json"
    cls = json.loads(index.read_text()).get("_class_name", "") if index.exists() else ""
    if "LatentUpscale" in cls:
        return "x2"
    if "Upscale" in cls:
        return "x4"
    ucfg = component_config(folder, "unet") or {}
    if any(t.startswith("K") for t in ucfg.get("down_block_types", [])):
        return "x2"
    if ucfg.get("num_class_embeds") or ucfg.get("in_channels") == 7:
        return "x4"
    return "sd2" if ucfg.get("cross_attention_dim", 768) == 1024 else "sd1"


def folder_family(folder: Path) -> str:
    """A diffusers pipeline folder's family, or "vae" for a bare VAE folder (config.json + weights at the top)."""
    return "vae" if is_vae_folder(folder) and not is_diffusers_folder(folder) else diffusers_family(folder)


def _text_encoder(out: LoadedModel, sd: dict, cfg_json: dict | None, b: Build, what: str):
    from ..models.text import TextEncoder
    from .hf_clip import HF_CLIP_IGNORABLE, hf_clip_keymap
    if sd and not any(k.startswith("text_model.") for k in sd):  # files saved by transformers >= 5
        sd = {f"text_model.{k}": v for k, v in sd.items()}
    cfg = hf_text_config(shapes_of(sd), out.family, cfg_json)
    ignore = HF_CLIP_IGNORABLE.__contains__
    out.text_encoder = b.load("text_encoder", lambda: TextEncoder(cfg), hf_clip_keymap(cfg), sd, what, ignore=ignore)
    out.tokenizer = tokenizer_for(cfg)
    b.drop("text position_ids (a constant arange)", [k for k in sd if ignore(k)])
    b.report["text_encoder"] = sum(1 for k in sd if not ignore(k))
    return cfg


def load_component(out: LoadedModel, comp: str, sd: dict, cfg_json: dict | None, b: Build, what: str) -> None:
    """One diffusers component (weights + optional config.json) into ``out``."""
    family, shapes = out.family, shapes_of(sd)
    if comp == "unet" and family == "x2":
        from ..models.latent_upscaler import KUNet
        from .kdiffusion import kunet_config_from_shapes
        cfg = dfs.kunet_config(cfg_json) if cfg_json else kunet_config_from_shapes(shapes, "diffusers")
        out.unet = b.load(comp, lambda: KUNet(cfg), dfs.kunet_diffusers_keymap(cfg), sd, what)
    elif comp == "unet":
        cfg = dfs.unet_config(cfg_json) if cfg_json else unet_config_from_diffusers_shapes(shapes, family)
        out.unet = b.load(comp, lambda: UNet(cfg), dfs.unet_keymap(cfg, meta_keys(lambda: UNet(cfg))), sd, what)
    elif comp == "vae":
        cfg = dfs.vae_config(cfg_json) if cfg_json else vae_config_from_diffusers_shapes(shapes)
        if cfg_json and cfg_json.get("scaling_factor") and family != "x4":  # the x4 pipeline forces 0.08333
            out.scale_factor = cfg_json["scaling_factor"]
        km = dfs.vae_keymap(cfg, meta_keys(lambda: AutoencoderKL(cfg)))
        out.vae = b.load(comp, lambda: AutoencoderKL(cfg), km, sd, what)
    else:
        cfg = _text_encoder(out, sd, cfg_json, b, what)  # reports the tensors it used
    if comp != "text_encoder":
        b.report[comp] = len(sd)
    out.configs[comp] = cfg


def _folder_constants(out: LoadedModel, folder: Path) -> None:
    """Latent scale and schedules from the folder's configs (the family defaults where they are silent)."""
    d = FAMILY_DEFAULTS[out.family]
    if out.family == "vae":  # the VAE's own config.json knows its latent scale (SD: 0.18215)
        out.scale_factor = float((component_config(folder, ".") or {}).get("scaling_factor", d["scale_factor"]))
        return
    sched = component_config(folder, "scheduler") or {}
    out.schedule = {"linear_start": sched.get("beta_start", d["linear_start"]), "linear_end": sched.get(
        "beta_end", d["linear_end"]), "timesteps": sched.get("num_train_timesteps", 1000)}
    if out.family == "x4":
        low = component_config(folder, "low_res_scheduler") or {}
        index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").exists() else {}
        out.schedule.update(max_noise_level=index.get("max_noise_level", d["max_noise_level"]),
                            noise_linear_start=low.get("beta_start", d["noise_linear_start"]),
                            noise_linear_end=low.get("beta_end", d["noise_linear_end"]))


def load_diffusers(folder: Path, b: Build, *, prediction, variant=None, reader=None) -> LoadedModel:
    """A diffusers pipeline folder (unet/, vae/, text_encoder/), or a bare VAE folder (family "vae"). ``reader``:
    weight file -> state dict (default: read and registered with ``b.sources``, so each tensor is given back
    once converted)."""
    reader = reader or (lambda f: b.sources.add(read_state_dict(f), f))
    family = folder_family(folder)
    d = FAMILY_DEFAULTS[family]
    sched = component_config(folder, "scheduler") or {}
    out = b.model(family, str(folder), scale_factor=d["scale_factor"],
                  prediction=prediction or PREDICTION_TYPES.get(sched.get("prediction_type"), d.get("prediction")))
    _folder_constants(out, folder)
    found = False
    for comp in ("unet", "vae", "text_encoder"):
        sub = "." if family == "vae" and comp == "vae" else comp  # a bare VAE folder has its files at the top
        f = component_file(folder, sub, variant)
        if f is None:
            continue
        found = True
        load_component(out, comp, reader(f), component_config(folder, sub), b, f"{comp} ({f.name})")
    if not found:
        raise CheckpointError(f"{folder}: diffusers folder without unet/, vae/ or text_encoder/ weights"
                              + (f" for variant {variant!r}" if variant else ""))
    return out
