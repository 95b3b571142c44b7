"""``sdup.load``: any supported checkpoint -> sdup modules.

    model = sdup.load("sd-v1-4.ckpt")                 # original single file (.ckpt / .safetensors)
    model = sdup.load("stable-diffusion-x4-upscaler/")  # diffusers folder
    model = sdup.load("my-finetune.ckpt", config="v2-inference-v.yaml")  # upstream YAML
    model.unet, model.vae, model.text_encoder, model.tokenizer, model.prediction, model.scale_factor

Strict: every tensor of the file is either loaded or dropped for a stated reason (schedule buffers,
EMA copies that were not selected, text-tower parts the penultimate-layer path never runs, CFW
training losses); anything else, or anything missing, raises ``KeyMismatch`` listing the keys.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from ..fileio import atomic_write
from ..models.unet import UNet, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from . import diffusers as dfs
from . import ldm
from .detect import (CLIP, OPENCLIP, STRUCT, UNET, VAE, Detection, detect, unet_config_from_diffusers_shapes,
                     unet_config_from_shapes, vae_config_from_diffusers_shapes, vae_config_from_shapes)
from .io import (CheckpointError, component_config, component_file, describe_path, is_diffusers_folder,
                 is_vae_folder, read_shapes, read_state_dict)
from .keymap import Entry, KeyMap, KeyMismatch

# What the weights cannot tell: per-family inference constants, from the upstream YAML configs (SD1
# v1-inference.yaml, SD2 v2-inference.yaml, x4-upscaling.yaml, StableSR v2-finetune_text_T_512.yaml) and the
# x2 notebook / diffusers scheduler config; a YAML passed to ``load`` overrides them.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd1": dict(prediction="eps", scale_factor=0.18215, linear_start=0.00085, linear_end=0.012),
    "sd2": dict(prediction="eps", scale_factor=0.18215, linear_start=0.00085, linear_end=0.012),
    "x4": dict(prediction="v", scale_factor=0.08333, linear_start=0.0001, linear_end=0.02, max_noise_level=350,
               noise_linear_start=0.0001, noise_linear_end=0.02),
    "stablesr": dict(prediction="eps", scale_factor=0.18215, linear_start=0.00085, linear_end=0.012),
    "x2": dict(prediction="sample", scale_factor=0.18215, linear_start=0.00085, linear_end=0.012),
    "stablesr_cfw_vae": dict(scale_factor=0.18215),
    "vae": dict(scale_factor=0.18215),
}
LDM_TARGETS = {  # upstream YAML ``model.target`` class name -> the families it can describe
    "LatentDiffusion": ("sd1", "sd2"),  # which one: decided by the text encoder
    "LatentUpscaleDiffusion": ("x4",),
    "LatentDiffusionSRTextWT": ("stablesr",), "LatentDiffusionSRTextWTFFHQ": ("stablesr",),
    "AutoencoderKLResi": ("stablesr_cfw_vae",), "AutoencoderKL": ("vae",),
}


@dataclass
class LoadedModel:
    family: str
    source: str
    unet: nn.Module | None = None
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: Any = None
    struct_encoder: nn.Module | None = None   # StableSR time-aware encoder
    prediction: str | None = None             # eps | v | sample (x2: the pipeline preconditions)
    scale_factor: float = 0.18215             # latent = scale_factor * vae latent
    schedule: dict = field(default_factory=dict)   # linear_start, linear_end, timesteps (+ x4 noise augmentation)
    configs: dict = field(default_factory=dict)    # component -> config dataclass
    report: dict = field(default_factory=dict)     # component -> number of tensors loaded; "dropped" -> {reason: n}
    dropped: dict = field(default_factory=dict, repr=False)  # reason -> the file's keys dropped for it
    keymaps: dict = field(default_factory=dict, repr=False)  # component -> the KeyMap it was loaded with, full
    # names on both sides ("unet.conv_in.weight" <-> "model.diffusion_model.input_blocks.0.0.weight"); empty for
    # sdup files. With ema=True the UNet's map names the model_ema.* copies it read (ldm.ema_key).

    def components(self) -> dict[str, nn.Module]:
        return {k: getattr(self, k) for k in ("unet", "vae", "text_encoder", "struct_encoder") if getattr(self, k) is not None}


# ------------------------------------------------------------------------------------------------
# building modules

def _check_shapes(module: nn.Module, sd: dict) -> None:
    """One line instead of torch's page of size mismatches: the configured architecture (a YAML for another size
    of model, say) does not fit the weights."""
    own = module.state_dict()
    bad = [k for k, v in sd.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(f"{type(module).__name__}: {len(bad)} tensors have other shapes than the configured "
                              f"model, e.g. {k}: {tuple(sd[k].shape)} in the weights, {tuple(own[k].shape)} configured "
                              f"(a --config for another size or family of model?)")


class _Build:
    """Per-load settings: device/dtype, strictness, and the report being filled.

    ``strict=False`` (used by ``inspect``) records missing/unexpected keys per component instead of
    raising, and loads what matches. ``device="meta"`` builds everything without memory (shapes only).
    """

    def __init__(self, device, dtype, strict: bool, report: dict):
        self.device, self.dtype, self.strict, self.report = torch.device(device), dtype, strict, report
        self.keymaps: dict[str, KeyMap] = {}
        self.dropped: dict[str, list[str]] = {}

    def drop(self, reason: str, keys) -> None:
        """Record keys of the file that are dropped on purpose (nothing if ``keys`` is empty)."""
        keys = list(keys)
        if keys:
            self.dropped[reason] = keys
            self.report.setdefault("dropped", {})[reason] = len(keys)

    def map(self, km: KeyMap, ext: dict, what: str, ignore=lambda k: False, *, comp: str, prefix: str = "") -> dict:
        """``km.to_sdup`` on one component's tensors (external names without ``prefix``); records the map."""
        self.keymaps[comp] = km.with_prefix(f"{comp}.", prefix)
        try:
            return km.to_sdup(ext, what, ignore=ignore)
        except KeyMismatch as e:
            if self.strict:
                raise
            self.report.setdefault("mismatch", {})[what] = {"missing": e.missing, "unexpected": e.unexpected}
            return km.to_sdup(ext, what, ignore=ignore, strict=False)

    def module(self, factory: Callable[[], nn.Module], sd: dict, keep_fp32: bool = False) -> nn.Module:
        """Build on the meta device and adopt the loaded tensors (no random init of 1B parameters).
        Non-persistent buffers (causal masks, fixed kernels) are recomputed by the modules' ``init_buffers``;
        a module without one is built normally instead."""
        with torch.device("meta"):
            module = factory()
        _check_shapes(module, sd)
        module.load_state_dict(sd, strict=self.strict, assign=True)
        if self.device.type != "meta":
            for m in module.modules():
                if hasattr(m, "init_buffers"):
                    m.init_buffers()
            if any(t.is_meta for t in module.buffers()):
                module = factory()
                module.load_state_dict(sd, strict=self.strict)
        dtype = None if keep_fp32 and self.dtype in (torch.float16, torch.bfloat16) else self.dtype
        module = module.to(device=self.device, dtype=dtype) if dtype is not None else module.to(self.device)
        return module.eval().requires_grad_(False)


def _tokenizer_for(cfg):
    """The CLIP BPE tokenizer for real-vocabulary encoders; None for the tiny test encoders (256 ids)."""
    from ..models.text import CLIP_VOCAB, Tokenizer
    return Tokenizer.for_config(cfg) if cfg.vocab_size == CLIP_VOCAB else None


def _meta_keys(factory) -> list[str]:
    with torch.device("meta"):
        return list(factory().state_dict())


# ------------------------------------------------------------------------------------------------
# text encoders (both layouts)

def _text_parts(shapes: dict, yaml_cond: dict | None, layout: str):
    """(TextConfig, KeyMap without prefix, ignore predicate) for the text encoder of a checkpoint."""
    from ..models import text as T
    from . import hf_clip
    cfg = None
    if yaml_cond:
        params = yaml_cond.get("params", {}) or {}
        name = params.get("version") or params.get("arch")
        cfg = T.KNOWN_TEXT_CONFIGS.get(name) if name else None
        if cfg is None and "FrozenCLIPEmbedder" in yaml_cond.get("target", ""):
            cfg = T.CLIP_VIT_L14
        if cfg is None and "FrozenOpenCLIPEmbedder" in yaml_cond.get("target", ""):
            cfg = T.OPENCLIP_VIT_H14 if name in (None, "ViT-H-14") else None
    if cfg is None:
        try:
            cfg = T.text_config_from_shapes(shapes, layout)
        except ValueError as e:  # e.g. a head count the shapes do not tell
            raise CheckpointError(f"the text encoder's shape cannot be inferred from its weights ({e}): pass the "
                                  f"checkpoint's upstream YAML (--config), which names it") from None
    if layout == "openclip":
        return cfg, hf_clip.openclip_keymap(cfg), hf_clip.openclip_ignorable(cfg).__contains__
    return cfg, hf_clip.hf_clip_keymap(cfg), hf_clip.HF_CLIP_IGNORABLE.__contains__


# ------------------------------------------------------------------------------------------------
# original single-file checkpoints

def _yaml_params(config) -> dict | None:
    if config is None:
        return None
    from omegaconf import OmegaConf
    try:
        conf = OmegaConf.to_container(OmegaConf.load(config) if isinstance(config, (str, Path)) else OmegaConf.create(config))
    except Exception as e:
        raise CheckpointError(f"{config}: not a readable YAML config ({str(e).splitlines()[0]})") from None
    if "model" not in conf or "params" not in conf["model"]:
        raise CheckpointError(f"{config}: not an upstream LDM config (no model.params)")
    return conf["model"]


def _prediction(family: str, yaml: dict | None, name: str, prediction: str | None) -> str | None:
    if prediction:
        return prediction
    if yaml is not None:
        return yaml["params"].get("parameterization", "eps")
    if family in ("sd2", "stablesr") and re.search(r"768", name):
        return "v"
    return FAMILY_DEFAULTS.get(family, {}).get("prediction")


def _ldm_constants(out: LoadedModel, params: dict) -> None:
    d = FAMILY_DEFAULTS[out.family]
    out.scale_factor = params.get("scale_factor", d["scale_factor"])
    out.schedule = {"linear_start": params.get("linear_start", d["linear_start"]),
                    "linear_end": params.get("linear_end", d["linear_end"]), "timesteps": params.get("timesteps", 1000)}
    if out.family == "x4":
        low = (params.get("low_scale_config") or {}).get("params", {})
        noise = low.get("noise_schedule_config", {})
        out.schedule.update(max_noise_level=low.get("max_noise_level", d["max_noise_level"]),
                            noise_linear_start=noise.get("linear_start", d["noise_linear_start"]),
                            noise_linear_end=noise.get("linear_end", d["noise_linear_end"]))


def _load_ldm(name: str, sd: dict, det: Detection, yaml: dict | None, b: _Build, *, ema: bool, prediction) -> LoadedModel:
    family = det.family
    params = (yaml or {}).get("params", {})
    if yaml is not None:
        target = yaml.get("target", "").rsplit(".", 1)[-1]
        if target in LDM_TARGETS and family not in LDM_TARGETS[target]:
            raise CheckpointError(f"{name}: the YAML describes {target} ({' / '.join(LDM_TARGETS[target])}) but the "
                                  f"weights look like {family}: pass the YAML of this checkpoint's family")
    out = LoadedModel(family=family, source=name, report=b.report, dropped=b.dropped, keymaps=b.keymaps)
    if family in ("stablesr_cfw_vae", "vae"):
        return _load_vae_only(out, sd, params, b)
    out.prediction = _prediction(family, yaml, Path(name).name, prediction)
    _ldm_constants(out, params)
    parts = ldm.split_components(sd)
    shapes = {c: {k: tuple(v.shape) for k, v in p.items()} for c, p in parts.items()}
    b.report.setdefault("dropped", {})  # present (maybe empty) for every original single file

    # UNet (+ the EMA copies of a -full-ema file when asked)
    unet_ext, other = parts.get("unet", {}), parts["other"]
    if not unet_ext:
        raise CheckpointError(f"{name}: no UNet weights (model.diffusion_model.*) in this {family} file")
    ucfg = UNetConfig.from_ldm(params["unet_config"]["params"]) if yaml else unet_config_from_shapes(shapes["unet"], family)
    factory = lambda: UNet(ucfg)
    if family == "stablesr":
        from ..models.stablesr import add_sft_layers
        sft = _sft_channels(shapes["unet"])
        factory = lambda: add_sft_layers(UNet(ucfg), sft)
        out.configs["sft_channels"] = sft
    ema_keys = {k for k in other if k.startswith("model_ema.") and k not in ldm.EMA_SCALARS}
    if ema:
        if not ema_keys:
            raise CheckpointError(f"{name}: ema=True but the file has no model_ema.* weights")
        no_copy = [ldm.ema_key(k) for k in unet_ext if ldm.ema_key(k) not in ema_keys]
        stray = sorted(ema_keys - {ldm.ema_key(k) for k in unet_ext})
        if no_copy or stray:  # a partial EMA set: never mix EMA and raw weights silently
            raise CheckpointError(
                f"{name}: ema=True but the EMA set does not match the UNet: {len(ema_keys)} model_ema.* weights in "
                f"the file, {len(no_copy)} of the {len(unet_ext)} UNet weights have none (e.g. {(no_copy or ['-'])[0]}), "
                f"{len(stray)} match no UNet weight (e.g. {(stray or ['-'])[0]}); load without ema=True to use the "
                "model.diffusion_model.* weights")
        unet_ext = {k: other[ldm.ema_key(k)] for k in unet_ext}
    km = ldm.unet_keymap(ucfg, _meta_keys(factory))
    out.unet = b.module(factory, b.map(km, unet_ext, f"unet ({UNET}*)", comp="unet", prefix=UNET))
    if ema:  # record the keys actually read: the EMA copies
        b.keymaps["unet"] = KeyMap(Entry(e.sdup, tuple(ldm.ema_key(k[len(UNET):]) for k in e.ext), e.op)
                                   for e in b.keymaps["unet"].entries)
    out.configs["unet"] = ucfg
    b.report["unet"] = len(unet_ext)

    # VAE (kept in fp32 when the rest runs in fp16/bf16)
    if "vae" in parts:
        vcfg = VAEConfig.from_ldm(params["first_stage_config"]["params"]) if yaml else vae_config_from_shapes(shapes["vae"])
        km = ldm.vae_keymap(vcfg, _meta_keys(lambda: AutoencoderKL(vcfg)))
        out.vae = b.module(lambda: AutoencoderKL(vcfg), b.map(km, parts["vae"], f"vae ({VAE}*)", comp="vae", prefix=VAE),
                           keep_fp32=True)
        out.configs["vae"] = vcfg
        b.report["vae"] = len(parts["vae"])

    # text encoder: HF CLIP layout (SD1) or open_clip layout (SD2 / x4 / StableSR)
    if "text_encoder" in parts:
        from ..models.text import TextEncoder
        hf = any(k.startswith(CLIP) for k in sd)
        prefix = CLIP if hf else OPENCLIP
        tcfg, km, ignore = _text_parts(shapes["text_encoder"], params.get("cond_stage_config"), "hf" if hf else "openclip")
        text_sd = b.map(km, parts["text_encoder"], f"text encoder ({prefix}*)", ignore=ignore, comp="text_encoder",
                        prefix=prefix)
        ignored = [prefix + k for k in parts["text_encoder"] if ignore(k)]
        b.drop("text-tower tensors this model never uses (position_ids, last block, projection)", ignored)
        out.text_encoder = b.module(lambda: TextEncoder(tcfg), text_sd)
        out.tokenizer = _tokenizer_for(tcfg)
        out.configs["text_encoder"] = tcfg
        b.report["text_encoder"] = len(parts["text_encoder"]) - len(ignored)

    # StableSR time-aware encoder
    if "struct_encoder" in parts:
        from ..models.stablesr import TimeAwareEncoder, TimeAwareEncoderConfig
        from .ldm import struct_encoder_config_from_shapes, struct_encoder_keymap
        scfg = (TimeAwareEncoderConfig.from_ldm(params["structcond_stage_config"]["params"]) if yaml
                else struct_encoder_config_from_shapes(shapes["struct_encoder"]))
        km = struct_encoder_keymap(scfg, _meta_keys(lambda: TimeAwareEncoder(scfg)))
        out.struct_encoder = b.module(lambda: TimeAwareEncoder(scfg),
                                      b.map(km, parts["struct_encoder"], f"time-aware encoder ({STRUCT}*)",
                                            comp="struct_encoder", prefix=STRUCT))
        out.configs["struct_encoder"] = scfg
        b.report["struct_encoder"] = len(parts["struct_encoder"])

    # every other tensor must be a known buffer
    unknown = sorted(k for k in other if k not in ldm.IGNORED_BUFFERS and k not in ema_keys)
    if unknown:
        if b.strict:
            raise KeyMismatch(f"{name}: top level", [], unknown)
        b.report.setdefault("mismatch", {})["top level"] = {"missing": [], "unexpected": unknown}
    b.drop("schedule / EMA book-keeping buffers (recomputed from the config)",
           [k for k in other if k in ldm.IGNORED_BUFFERS])
    if ema:
        b.drop("UNet weights replaced by their EMA copies (ema=True: swapped in)", [UNET + k for k in parts["unet"]])
    else:
        b.drop("EMA weights (not selected: pass ema=True to use them)", sorted(ema_keys))
    return out


def _sft_channels(unet_shapes: dict) -> int:
    k = next((k for k in unet_shapes if k.endswith("spade.mlp_shared.0.weight")), None)
    if k is None:
        raise CheckpointError("StableSR checkpoint without SFT (spade) layers in its UNet")
    return unet_shapes[k][1]


def _load_vae_only(out: LoadedModel, sd: dict, params: dict, b: _Build) -> LoadedModel:
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    out.scale_factor = FAMILY_DEFAULTS[out.family]["scale_factor"]
    if out.family == "stablesr_cfw_vae":
        from ..models.stablesr import CFWAutoencoder, CFWConfig
        from .ldm import CFW_IGNORABLE, cfw_config_from_shapes, cfw_vae_keymap
        cfg = CFWConfig.from_ldm(params) if params else cfw_config_from_shapes(shapes)
        factory, ignore = (lambda: CFWAutoencoder(cfg)), CFW_IGNORABLE
        km = cfw_vae_keymap(cfg, _meta_keys(factory))
        b.drop("CFW training losses (loss.*)", [k for k in sd if ignore(k)])
    else:
        cfg = VAEConfig.from_ldm(params) if params else vae_config_from_shapes(shapes)
        factory, ignore = (lambda: AutoencoderKL(cfg)), (lambda k: False)
        km = ldm.vae_keymap(cfg, _meta_keys(factory))
    out.vae = b.module(factory, b.map(km, sd, "vae", ignore=ignore, comp="vae"), keep_fp32=True)
    out.configs["vae"] = cfg
    b.report["vae"] = sum(1 for k in sd if not ignore(k))
    return out


# ------------------------------------------------------------------------------------------------
# diffusers folders (or single diffusers component files / manifests)

def _hf_text_config(shapes: dict, family: str, cfg_json: dict | None):
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


def _diffusers_family(folder: Path) -> str:
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


def _folder_family(folder: Path) -> str:
    """A diffusers pipeline folder's family, or "vae" for a bare VAE folder (config.json + weights at the top)."""
    return "vae" if is_vae_folder(folder) and not is_diffusers_folder(folder) else _diffusers_family(folder)


def _diffusers_component(out: LoadedModel, comp: str, sd: dict, cfg_json: dict | None, b: _Build, what: str) -> None:
    """One diffusers component (weights + optional config.json) into ``out``."""
    family = out.family
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    if comp == "unet" and family == "x2":
        from ..models.latent_upscaler import KUNet
        from .kdiffusion import kunet_config_from_shapes
        cfg = dfs.kunet_config(cfg_json) if cfg_json else kunet_config_from_shapes(shapes, "diffusers")
        out.unet = b.module(lambda: KUNet(cfg), b.map(dfs.kunet_diffusers_keymap(cfg), sd, what, comp=comp))
    elif comp == "unet":
        cfg = dfs.unet_config(cfg_json) if cfg_json else unet_config_from_diffusers_shapes(shapes, family)
        out.unet = b.module(lambda: UNet(cfg), b.map(dfs.unet_keymap(cfg, _meta_keys(lambda: UNet(cfg))), sd, what,
                                                     comp=comp))
    elif comp == "vae":
        cfg = dfs.vae_config(cfg_json) if cfg_json else vae_config_from_diffusers_shapes(shapes)
        if cfg_json and cfg_json.get("scaling_factor") and family != "x4":  # the x4 pipeline forces 0.08333
            out.scale_factor = cfg_json["scaling_factor"]
        km = dfs.vae_keymap(cfg, _meta_keys(lambda: AutoencoderKL(cfg)))
        out.vae = b.module(lambda: AutoencoderKL(cfg), b.map(km, sd, what, comp=comp), keep_fp32=True)
    else:
        from ..models.text import TextEncoder
        from .hf_clip import HF_CLIP_IGNORABLE, hf_clip_keymap
        if sd and not any(k.startswith("text_model.") for k in sd):  # files saved by transformers >= 5
            sd = {f"text_model.{k}": v for k, v in sd.items()}
            shapes = {f"text_model.{k}": v for k, v in shapes.items()}
        cfg = _hf_text_config(shapes, family, cfg_json)
        ignore = HF_CLIP_IGNORABLE.__contains__
        out.text_encoder = b.module(lambda: TextEncoder(cfg), b.map(hf_clip_keymap(cfg), sd, what, ignore=ignore,
                                                                                comp=comp))
        out.tokenizer = _tokenizer_for(cfg)
        b.drop("text position_ids (a constant arange)", [k for k in sd if ignore(k)])
        sd = {k: v for k, v in sd.items() if not ignore(k)}
    out.configs[comp] = cfg
    b.report[comp] = len(sd)


def _load_diffusers(folder: Path, b: _Build, *, prediction, variant=None, reader=None) -> LoadedModel:
    """A diffusers pipeline folder (unet/, vae/, text_encoder/), or a bare VAE folder (family "vae")."""
    reader = reader or read_state_dict
    family = _folder_family(folder)
    bare_vae = family == "vae"
    d = FAMILY_DEFAULTS[family]
    sched = component_config(folder, "scheduler") or {}
    out = LoadedModel(family=family, source=str(folder), scale_factor=d["scale_factor"], report=b.report,
                      dropped=b.dropped, keymaps=b.keymaps,
                      prediction=prediction or {"epsilon": "eps", "v_prediction": "v", "sample": "sample"}.get(
                          sched.get("prediction_type"), d.get("prediction")))
    if bare_vae:  # the VAE's own config.json knows its latent scale (SD: 0.18215)
        out.scale_factor = float((component_config(folder, ".") or {}).get("scaling_factor", d["scale_factor"]))
    else:
        out.schedule = {"linear_start": sched.get("beta_start", d["linear_start"]), "linear_end": sched.get(
            "beta_end", d["linear_end"]), "timesteps": sched.get("num_train_timesteps", 1000)}
    if family == "x4":
        low = component_config(folder, "low_res_scheduler") or {}
        index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").exists() else {}
        out.schedule.update(max_noise_level=index.get("max_noise_level", d["max_noise_level"]),
                            noise_linear_start=low.get("beta_start", d["noise_linear_start"]),
                            noise_linear_end=low.get("beta_end", d["noise_linear_end"]))
    found = False
    for comp in ("unet", "vae", "text_encoder"):
        sub = "." if bare_vae and comp == "vae" else comp  # a bare VAE folder has its files at the top
        f = component_file(folder, sub, variant)
        if f is None:
            continue
        found = True
        _diffusers_component(out, comp, reader(f), component_config(folder, sub), b, f"{comp} ({f.name})")
    if not found:
        raise CheckpointError(f"{folder}: diffusers folder without unet/, vae/ or text_encoder/ weights"
                              + (f" for variant {variant!r}" if variant else ""))
    return out


# ------------------------------------------------------------------------------------------------
# sdup's own single file: flat "component.key" tensors + configs in the safetensors metadata

def _config_classes() -> dict[str, type]:
    from ..models.latent_upscaler import KUNetConfig
    from ..models.stablesr import CFWConfig, TimeAwareEncoderConfig
    from ..models.text import TextConfig
    return {c.__name__: c for c in (UNetConfig, VAEConfig, TextConfig, TimeAwareEncoderConfig, CFWConfig, KUNetConfig)}


def save_sdup(model: LoadedModel, path: str | Path) -> None:
    """Write a LoadedModel as one sdup safetensors file (configs and constants in the header);
    written to a temporary name first, so an interrupted save never leaves a partial file."""
    from safetensors.torch import save_file
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in model.components().items()
               for k, v in m.state_dict().items()}
    configs = {name: {"class": type(c).__name__, "fields": asdict(c)} for name, c in model.configs.items()
               if hasattr(c, "__dataclass_fields__")}
    consts = {"prediction": model.prediction, "scale_factor": model.scale_factor, "schedule": model.schedule,
              "sft_channels": model.configs.get("sft_channels")}
    meta = {"sdup_family": model.family, "sdup_configs": json.dumps(configs), "sdup_constants": json.dumps(consts)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _load_sdup(name: str, sd: dict, meta: dict, b: _Build) -> LoadedModel:
    from ..models.text import TextEncoder
    classes = _config_classes()
    configs = {}
    for comp, c in json.loads(meta["sdup_configs"]).items():
        configs[comp] = classes[c["class"]](**{k: tuple(v) if isinstance(v, list) else v for k, v in c["fields"].items()})
    consts = json.loads(meta["sdup_constants"])
    out = LoadedModel(family=meta["sdup_family"], source=name, prediction=consts["prediction"],
                      scale_factor=consts["scale_factor"], schedule=consts["schedule"], configs=configs, report=b.report)
    if consts.get("sft_channels"):
        configs["sft_channels"] = consts["sft_channels"]
    groups: dict[str, dict] = {}
    for k, v in sd.items():
        comp, rest = k.split(".", 1)
        groups.setdefault(comp, {})[rest] = v
    for comp, part in groups.items():
        if comp not in configs:
            raise CheckpointError(f"{name}: sdup file has tensors for {comp!r} but no config for it")
        cfg = configs[comp]
        kind = type(cfg).__name__
        if kind == "KUNetConfig":
            from ..models.latent_upscaler import KUNet
            factory = lambda: KUNet(cfg)
        elif kind == "UNetConfig" and consts.get("sft_channels"):
            from ..models.stablesr import add_sft_layers
            factory = lambda: add_sft_layers(UNet(cfg), consts["sft_channels"])
        elif kind == "UNetConfig":
            factory = lambda: UNet(cfg)
        elif kind == "CFWConfig":
            from ..models.stablesr import CFWAutoencoder
            factory = lambda: CFWAutoencoder(cfg)
        elif kind == "VAEConfig":
            factory = lambda: AutoencoderKL(cfg)
        elif kind == "TextConfig":
            factory = lambda: TextEncoder(cfg)
            out.tokenizer = _tokenizer_for(cfg)
        else:
            from ..models.stablesr import TimeAwareEncoder
            factory = lambda: TimeAwareEncoder(cfg)
        setattr(out, comp, b.module(factory, part, keep_fp32=comp == "vae"))
        b.report[comp] = len(part)
    return out


def _load_kdiffusion(name: str, sd: dict, b: _Build) -> LoadedModel:
    from ..models.latent_upscaler import KUNet
    from .kdiffusion import kunet_config_from_shapes, kunet_kdiffusion_keymap
    d = FAMILY_DEFAULTS["x2"]
    out = LoadedModel(family="x2", source=name, prediction=d["prediction"], scale_factor=d["scale_factor"],
                      report=b.report, dropped=b.dropped, keymaps=b.keymaps,
                      schedule={"linear_start": d["linear_start"], "linear_end": d["linear_end"], "timesteps": 1000})
    cfg = kunet_config_from_shapes({k: tuple(v.shape) for k, v in sd.items()}, "kdiffusion")
    km = kunet_kdiffusion_keymap(cfg)  # accepts and drops the fixed kernel buffers (km.kernels) itself
    out.unet = b.module(lambda: KUNet(cfg), b.map(km, sd, "k-diffusion model", comp="unet"))
    out.configs["unet"] = cfg
    kernels = [k for k in sd if k in km.kernels]
    b.report["unet"] = len(sd) - len(kernels)
    b.drop("fixed resampling kernels", kernels)
    return out


# ------------------------------------------------------------------------------------------------

def load_state_dict(sd: dict, *, name: str = "checkpoint", metadata: dict | None = None, config=None, device="cpu",
                    dtype=torch.float32, ema: bool = False, prediction: str | None = None, strict: bool = True,
                    component_config: dict | None = None) -> LoadedModel:
    """``load`` for a state dict already in memory (real or meta tensors)."""
    b = _Build(device, dtype, strict, {})
    metadata = metadata or {}
    if "sdup_family" in metadata:
        return _load_sdup(name, sd, metadata, b)
    det = detect({k: tuple(v.shape) for k, v in sd.items()}, metadata)
    if det.family == "x2" and det.layout == "kdiffusion":
        return _load_kdiffusion(name, sd, b)
    if det.component is not None:  # one diffusers component on its own
        out = LoadedModel(family=det.family, source=name, report=b.report, dropped=b.dropped, keymaps=b.keymaps,
                          prediction=prediction or FAMILY_DEFAULTS.get(det.family, {}).get("prediction"))
        _diffusers_component(out, det.component, sd, component_config, b, f"{det.component} ({name})")
        return out
    if det.family == "unknown":
        raise CheckpointError(f"{name}: unsupported checkpoint: {det.notes[0] if det.notes else 'unknown layout'}; expected "
                              "an original single-file checkpoint (SD 1.x/2.x, x4 upscaler, StableSR, CFW VAE, k-diffusion "
                              "x2), a diffusers folder, or an sdup file")
    return _load_ldm(name, sd, det, _yaml_params(config), b, ema=ema, prediction=prediction)


def load(path: str | Path, config=None, *, device="cpu", dtype=torch.float32, ema: bool = False,
         prediction: str | None = None, variant: str | None = None, strict: bool = True) -> LoadedModel:
    """Load any supported checkpoint into sdup modules (see the module docstring).

    config: an upstream-style YAML (path or dict) for non-standard sizes; prediction: override
    eps / v where the weights cannot tell (SD 2.x, StableSR); ema: use the ``model_ema.*`` UNet
    weights of a -full-ema file; variant: diffusers weight variant (e.g. "fp16").
    The VAE stays fp32 when dtype is fp16/bf16 (the x4 VAE overflows in half precision).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder (see weights/README.md for where to put the official files)")
    if path.is_dir():
        if not is_diffusers_folder(path) and not is_vae_folder(path):
            raise CheckpointError(f"{describe_path(path)}: not a diffusers folder (no unet/, vae/ or text_encoder/ config.json)")
        return _load_diffusers(path, _Build(device, dtype, strict, {}), prediction=prediction, variant=variant)
    if path.suffix == ".json":
        raise CheckpointError(f"{path}: a key manifest has no weights (use `python -m sdup inspect` on it)")
    meta = read_shapes(path)[1] if path.suffix == ".safetensors" else {}
    return load_state_dict(read_state_dict(path), name=str(path), metadata=meta, config=config, device=device,
                           dtype=dtype, ema=ema, prediction=prediction, strict=strict)


def inspect(path: str | Path, config=None) -> tuple[Detection, LoadedModel | None, str | None]:
    """Detection plus a non-strict, meta-device load from the key/shape table only (no tensor data is
    read for safetensors and manifests). Returns (detection, model on meta or None, error line or None)."""
    path = Path(path)
    meta_of = lambda shapes: {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    try:
        if path.is_dir():
            if not is_diffusers_folder(path) and not is_vae_folder(path):
                raise CheckpointError(f"{describe_path(path)}: not a diffusers folder")
            det = Detection(_folder_family(path), "diffusers")
            model = _load_diffusers(path, _Build("meta", None, False, {}), prediction=None,
                                    reader=lambda f: meta_of(read_shapes(f)[0]))
            return det, model, None
        shapes, metadata = read_shapes(path)
        det = detect(shapes, metadata)
        model = load_state_dict(meta_of(shapes), name=str(path), metadata=metadata, config=config, device="meta",
                                dtype=None, strict=False)
        return det, model, None
    except (CheckpointError, KeyError, ValueError, ImportError) as e:
        det = locals().get("det") or Detection("unknown", "unknown")
        return det, None, str(e).splitlines()[0]


yaml_params, ldm_constants = _yaml_params, _ldm_constants  # public names (the weight-less dry run builds from them)
