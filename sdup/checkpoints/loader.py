"""``sdup.load``: any supported checkpoint -> sdup modules.

    model = sdup.load("sd-v1-4.ckpt")                 # original single file (.ckpt / .safetensors)
    model = sdup.load("stable-diffusion-x4-upscaler/")  # diffusers folder
    model = sdup.load("my-finetune.ckpt", config="v2-inference-v.yaml")  # upstream YAML
    model.unet, model.vae, model.text_encoder, model.tokenizer, model.prediction, model.scale_factor

Strict: every tensor of the file is either loaded or dropped for a stated reason (schedule buffers,
EMA copies that were not selected, text-tower parts the penultimate-layer path never runs, CFW
training losses); anything else, or anything missing, raises ``KeyMismatch`` listing the keys.

At the size of the result: files are memory-mapped where the format allows (safetensors, torch zip), each tensor
is converted to the load's dtype and device as it is mapped and its source given back at once (``build.Build``,
``io.Sources``); tensors the load drops (EMA copies not selected, schedule buffers) are never read.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import torch

from ..fileio import atomic_write
from ..models.unet import UNet, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from . import ldm
from .build import FAMILY_DEFAULTS, Build, LoadedModel, meta_keys, shapes_of, tokenizer_for
from .detect import CLIP, OPENCLIP, STRUCT, UNET, VAE, Detection, detect, unet_config_from_shapes, vae_config_from_shapes
from .folder import folder_family, load_component, load_diffusers
from .io import CheckpointError, Sources, describe_path, is_diffusers_folder, is_vae_folder, read_shapes, read_state_dict
from .keymap import Entry, KeyMap, KeyMismatch

__all__ = ["FAMILY_DEFAULTS", "LoadedModel", "inspect", "ldm_constants", "load", "load_state_dict", "save_sdup",
           "yaml_params"]

LDM_TARGETS = {  # upstream YAML ``model.target`` class name -> the families it can describe
    "LatentDiffusion": ("sd1", "sd2"),  # which one: decided by the text encoder
    "LatentUpscaleDiffusion": ("x4",),
    "LatentDiffusionSRTextWT": ("stablesr",), "LatentDiffusionSRTextWTFFHQ": ("stablesr",),
    "AutoencoderKLResi": ("stablesr_cfw_vae",), "AutoencoderKL": ("vae",),
}


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
# original single-file checkpoints: constants, then one function per component

def yaml_params(config) -> dict | None:
    """``model`` of an upstream LDM YAML (path, text or dict), with its ``target`` and ``params``; None for None."""
    if config is None:
        return None
    from omegaconf import OmegaConf
    try:
        conf = OmegaConf.to_container(OmegaConf.load(config) if isinstance(config, (str, Path)) else OmegaConf.create(config))
    except Exception as e:
        raise CheckpointError(f"{config}: not a readable YAML config ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(conf, dict) or not isinstance(conf.get("model"), dict) or not isinstance(conf["model"].get("params"), dict):
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


def ldm_constants(out: LoadedModel, params: dict) -> None:
    """Latent scale and schedules of ``out.family`` from YAML ``model.params`` (the family defaults where silent)."""
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
    _check_constants(out)


def _number(v, lo: float, hi: float, integer: bool = False) -> bool:
    kinds = (int,) if integer else (int, float)
    return isinstance(v, kinds) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi


def _check_constants(out: LoadedModel) -> None:
    """The YAML's latent scale and schedule (a hand-edited ``--config``): numbers in their ranges, or a ValueError."""
    s = out.schedule
    bad = [name for name, ok in (
        ("scale_factor", _number(out.scale_factor, 1e-6, 1e6)),
        ("timesteps", _number(s["timesteps"], 2, 100_000, integer=True)),
        ("linear_start", _number(s["linear_start"], 1e-12, 1)), ("linear_end", _number(s["linear_end"], 1e-12, 1)),
        ("max_noise_level", _number(s.get("max_noise_level", 1), 1, 100_000, integer=True)),
        ("noise linear_start", _number(s.get("noise_linear_start", 0.5), 1e-12, 1)),
        ("noise linear_end", _number(s.get("noise_linear_end", 0.5), 1e-12, 1))) if not ok]
    if bad:
        raise ValueError(f"config: {', '.join(bad)} out of range or not a number")


def _check_target(name: str, family: str, yaml: dict | None) -> None:
    target = (yaml or {}).get("target", "").rsplit(".", 1)[-1]
    if target in LDM_TARGETS and family not in LDM_TARGETS[target]:
        raise CheckpointError(f"{name}: the YAML describes {target} ({' / '.join(LDM_TARGETS[target])}) but the "
                              f"weights look like {family}: pass the YAML of this checkpoint's family")


def _ema_weights(name: str, unet_ext: dict, other: dict, ema_keys: set) -> dict:
    """The UNet's tensors taken from their ``model_ema.*`` copies; all of them, or an error."""
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
    return {k: other[ldm.ema_key(k)] for k in unet_ext}


def _ldm_unet(out: LoadedModel, name: str, parts: dict, params: dict, b: Build, ema: bool) -> set[str]:
    """The UNet (+ StableSR's SFT layers; the EMA copies of a -full-ema file when asked); returns the EMA keys."""
    unet_ext, other = parts.get("unet", {}), parts["other"]
    if not unet_ext:
        raise CheckpointError(f"{name}: no UNet weights (model.diffusion_model.*) in this {out.family} file")
    ucfg = UNetConfig.from_ldm(params["unet_config"]["params"]) if params else unet_config_from_shapes(
        shapes_of(unet_ext), out.family)
    factory = lambda: UNet(ucfg)  # noqa: E731
    if out.family == "stablesr":
        from ..models.stablesr import add_sft_layers
        sft = out.configs["sft_channels"] = _sft_channels(shapes_of(unet_ext))
        factory = lambda: add_sft_layers(UNet(ucfg), sft)  # noqa: E731
    ema_keys = {k for k in other if k.startswith("model_ema.") and k not in ldm.EMA_SCALARS}
    if ema:
        unet_ext = _ema_weights(name, unet_ext, other, ema_keys)
    out.unet = b.load("unet", factory, ldm.unet_keymap(ucfg, meta_keys(factory)), unet_ext, f"unet ({UNET}*)",
                      prefix=UNET)
    if ema:  # record the keys actually read: the EMA copies
        b.keymaps["unet"] = KeyMap(Entry(e.sdup, tuple(ldm.ema_key(k[len(UNET):]) for k in e.ext), e.op)
                                   for e in b.keymaps["unet"].entries)
    out.configs["unet"] = ucfg
    b.report["unet"] = len(unet_ext)
    return ema_keys


def _ldm_vae(out: LoadedModel, ext: dict, params: dict, b: Build) -> None:
    vcfg = VAEConfig.from_ldm(params["first_stage_config"]["params"]) if params else vae_config_from_shapes(shapes_of(ext))
    km = ldm.vae_keymap(vcfg, meta_keys(lambda: AutoencoderKL(vcfg)))
    out.vae = b.load("vae", lambda: AutoencoderKL(vcfg), km, ext, f"vae ({VAE}*)", prefix=VAE)
    out.configs["vae"] = vcfg
    b.report["vae"] = len(ext)


def _ldm_text_encoder(out: LoadedModel, ext: dict, params: dict, b: Build, layout: str) -> None:
    """HF CLIP layout (SD1) or open_clip layout (SD2 / x4 / StableSR)."""
    from ..models.text import TextEncoder
    prefix = CLIP if layout == "hf" else OPENCLIP
    tcfg, km, ignore = _text_parts(shapes_of(ext), params.get("cond_stage_config"), layout)
    ignored = [prefix + k for k in ext if ignore(k)]
    b.drop("text-tower tensors this model never uses (position_ids, last block, projection)", ignored)
    out.text_encoder = b.load("text_encoder", lambda: TextEncoder(tcfg), km, ext, f"text encoder ({prefix}*)",
                              ignore=ignore, prefix=prefix)
    out.tokenizer = tokenizer_for(tcfg)
    out.configs["text_encoder"] = tcfg
    b.report["text_encoder"] = len(ext) - len(ignored)


def _ldm_struct_encoder(out: LoadedModel, ext: dict, params: dict, b: Build) -> None:
    """StableSR's time-aware encoder."""
    from ..models.stablesr import TimeAwareEncoder, TimeAwareEncoderConfig
    scfg = (TimeAwareEncoderConfig.from_ldm(params["structcond_stage_config"]["params"]) if params
            else ldm.struct_encoder_config_from_shapes(shapes_of(ext)))
    km = ldm.struct_encoder_keymap(scfg, meta_keys(lambda: TimeAwareEncoder(scfg)))
    out.struct_encoder = b.load("struct_encoder", lambda: TimeAwareEncoder(scfg), km, ext,
                                f"time-aware encoder ({STRUCT}*)", prefix=STRUCT)
    out.configs["struct_encoder"] = scfg
    b.report["struct_encoder"] = len(ext)


def _ldm_leftovers(name: str, parts: dict, ema_keys: set, b: Build, ema: bool) -> None:
    """Every tensor outside the components must be a known buffer or an EMA copy; record what was dropped."""
    other = parts["other"]
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


def _load_ldm(name: str, sd: dict, det: Detection, yaml: dict | None, b: Build, *, ema: bool, prediction) -> LoadedModel:
    _check_target(name, det.family, yaml)
    params = yaml.get("params") or {} if yaml else {}
    out = b.model(det.family, name)
    if det.family in ("stablesr_cfw_vae", "vae"):
        return _load_vae_only(out, sd, params, b)
    out.prediction = _prediction(det.family, yaml, Path(name).name, prediction)
    ldm_constants(out, params)
    parts = ldm.split_components(sd)
    b.report.setdefault("dropped", {})  # present (maybe empty) for every original single file
    ema_keys = _ldm_unet(out, name, parts, params, b, ema)
    if "vae" in parts:
        _ldm_vae(out, parts["vae"], params, b)
    if "text_encoder" in parts:
        _ldm_text_encoder(out, parts["text_encoder"], params, b, "hf" if any(k.startswith(CLIP) for k in sd) else "openclip")
    if "struct_encoder" in parts:
        _ldm_struct_encoder(out, parts["struct_encoder"], params, b)
    _ldm_leftovers(name, parts, ema_keys, b, ema)
    return out


def _sft_channels(unet_shapes: dict) -> int:
    channels = ldm.sft_feature_channels_from_shapes(unet_shapes)
    if channels is None:
        raise CheckpointError("StableSR checkpoint without SFT (spade) layers in its UNet")
    return channels


def _load_vae_only(out: LoadedModel, sd: dict, params: dict, b: Build) -> LoadedModel:
    shapes = shapes_of(sd)
    out.scale_factor = FAMILY_DEFAULTS[out.family]["scale_factor"]
    if out.family == "stablesr_cfw_vae":
        from ..models.stablesr import CFWAutoencoder, CFWConfig
        cfg = CFWConfig.from_ldm(params) if params else ldm.cfw_config_from_shapes(shapes)
        factory, ignore = (lambda: CFWAutoencoder(cfg)), ldm.CFW_IGNORABLE
        km = ldm.cfw_vae_keymap(cfg, meta_keys(factory))
        b.drop("CFW training losses (loss.*)", [k for k in sd if ignore(k)])
    else:
        cfg = VAEConfig.from_ldm(params) if params else vae_config_from_shapes(shapes)
        factory, ignore = (lambda: AutoencoderKL(cfg)), (lambda k: False)
        km = ldm.vae_keymap(cfg, meta_keys(factory))
    out.vae = b.load("vae", factory, km, sd, "vae", ignore=ignore)
    out.configs["vae"] = cfg
    b.report["vae"] = sum(1 for k in sd if not ignore(k))
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


def _sdup_factory(cfg, sft_channels: int | None):
    """The module an sdup file's component config describes."""
    from ..models.latent_upscaler import KUNet
    from ..models.stablesr import CFWAutoencoder, TimeAwareEncoder, add_sft_layers
    from ..models.text import TextEncoder
    kind = type(cfg).__name__
    if kind == "UNetConfig" and sft_channels:
        return lambda: add_sft_layers(UNet(cfg), sft_channels)
    classes = {"KUNetConfig": KUNet, "UNetConfig": UNet, "CFWConfig": CFWAutoencoder, "VAEConfig": AutoencoderKL,
               "TextConfig": TextEncoder, "TimeAwareEncoderConfig": TimeAwareEncoder}
    return lambda: classes[kind](cfg)


def _sdup_record(name: str, meta: dict) -> tuple[dict, dict]:
    """(configs, constants) from an sdup file's metadata; metadata anyone may have edited (wrong types, missing
    keys, unknown classes or fields) -> one ``CheckpointError`` line."""
    classes = _config_classes()
    try:
        configs = {}
        for comp, c in json.loads(meta["sdup_configs"]).items():
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in c["fields"].items()}
            configs[comp] = classes[c["class"]](**fields)
        consts = json.loads(meta["sdup_constants"])
        if not isinstance(consts, dict) or not all(k in consts for k in ("prediction", "scale_factor", "schedule")):
            raise ValueError("sdup_constants is not an object with prediction, scale_factor and schedule")
    except (KeyError, TypeError, AttributeError, ValueError, RecursionError) as e:
        what = f"{type(e).__name__} {str(e)[:80]}" if isinstance(e, KeyError) else str(e).splitlines()[0][:120]
        raise CheckpointError(f"{name}: the sdup file's metadata is not valid ({what or type(e).__name__})") from None
    return configs, consts


def _load_sdup(name: str, sd: dict, meta: dict, b: Build) -> LoadedModel:
    configs, consts = _sdup_record(name, meta)
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
        if type(configs[comp]).__name__ == "TextConfig":
            out.tokenizer = tokenizer_for(configs[comp])
        setattr(out, comp, b.module(comp, _sdup_factory(configs[comp], consts.get("sft_channels")), part))
        b.report[comp] = len(part)
    return out


def _load_kdiffusion(name: str, sd: dict, b: Build) -> LoadedModel:
    from ..models.latent_upscaler import KUNet
    from .kdiffusion import kunet_config_from_shapes, kunet_kdiffusion_keymap
    d = FAMILY_DEFAULTS["x2"]
    out = b.model("x2", name, prediction=d["prediction"], scale_factor=d["scale_factor"],
                  schedule={"linear_start": d["linear_start"], "linear_end": d["linear_end"], "timesteps": 1000})
    cfg = kunet_config_from_shapes(shapes_of(sd), "kdiffusion")
    km = kunet_kdiffusion_keymap(cfg)  # accepts and drops the fixed kernel buffers (km.kernels) itself
    out.unet = b.load("unet", lambda: KUNet(cfg), km, sd, "k-diffusion model")
    out.configs["unet"] = cfg
    kernels = [k for k in sd if k in km.kernels]
    b.report["unet"] = len(sd) - len(kernels)
    b.drop("fixed resampling kernels", kernels)
    return out


# ------------------------------------------------------------------------------------------------

def _load_flat(sd: dict, b: Build, *, name: str, metadata: dict | None, config, ema: bool, prediction: str | None,
               component_config: dict | None = None) -> LoadedModel:
    """Any flat state dict: an sdup file, the k-diffusion x2 model, one diffusers component, an original file."""
    metadata = metadata or {}
    if "sdup_family" in metadata:
        return _load_sdup(name, sd, metadata, b)
    det = detect(shapes_of(sd), metadata)
    if det.family == "x2" and det.layout == "kdiffusion":
        return _load_kdiffusion(name, sd, b)
    if det.component is not None:  # one diffusers component on its own
        out = b.model(det.family, name, prediction=prediction or FAMILY_DEFAULTS.get(det.family, {}).get("prediction"))
        load_component(out, det.component, sd, component_config, b, f"{det.component} ({name})")
        return out
    if det.family == "unknown":
        raise CheckpointError(f"{name}: unsupported checkpoint: {det.notes[0] if det.notes else 'unknown layout'}; expected "
                              "an original single-file checkpoint (SD 1.x/2.x, x4 upscaler, StableSR, CFW VAE, k-diffusion "
                              "x2), a diffusers folder, or an sdup file")
    return _load_ldm(name, sd, det, yaml_params(config), b, ema=ema, prediction=prediction)


# what building modules from a configuration nobody checked can raise (a hand-edited --config: wrong types or sizes)
BUILD_ERRORS = (TypeError, RuntimeError, IndexError, AttributeError, ZeroDivisionError, OverflowError)


def load_state_dict(sd: dict, *, name: str = "checkpoint", metadata: dict | None = None, config=None, device="cpu",
                    dtype=torch.float32, ema: bool = False, prediction: str | None = None, strict: bool = True,
                    component_config: dict | None = None) -> LoadedModel:
    """``load`` for a state dict already in memory (real or meta tensors; they are left as they are)."""
    return _load_flat(sd, Build(device, dtype, strict), name=name, metadata=metadata, config=config, ema=ema,
                      prediction=prediction, component_config=component_config)


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
    b = Build(device, dtype, strict, Sources())
    if path.is_dir():
        if not is_diffusers_folder(path) and not is_vae_folder(path):
            raise CheckpointError(f"{describe_path(path)}: not a diffusers folder (no unet/, vae/ or text_encoder/ config.json)")
        return load_diffusers(path, b, prediction=prediction, variant=variant)
    if path.suffix == ".json":
        raise CheckpointError(f"{path}: a key manifest has no weights (use `python -m sdup inspect` on it)")
    meta = read_shapes(path)[1] if path.suffix == ".safetensors" else {}
    return _load_flat(b.sources.add(read_state_dict(path), path), b, name=str(path), metadata=meta, config=config,
                      ema=ema, prediction=prediction)


def inspect(path: str | Path, config=None) -> tuple[Detection, LoadedModel | None, str | None]:
    """Detection plus a non-strict, meta-device load from the key/shape table only (no tensor data is
    read for safetensors and manifests). Returns (detection, model on meta or None, error line or None)."""
    path = Path(path)
    meta_of = lambda shapes: {k: torch.empty(s, device="meta") for k, s in shapes.items()}  # noqa: E731
    try:
        if path.is_dir():
            if not is_diffusers_folder(path) and not is_vae_folder(path):
                raise CheckpointError(f"{describe_path(path)}: not a diffusers folder")
            det = Detection(folder_family(path), "diffusers")
            model = load_diffusers(path, Build("meta", None, False), prediction=None,
                                   reader=lambda f: meta_of(read_shapes(f)[0]))
            return det, model, None
        shapes, metadata = read_shapes(path)
        det = detect(shapes, metadata)
        model = load_state_dict(meta_of(shapes), name=str(path), metadata=metadata, config=config, device="meta",
                                dtype=None, strict=False)
        return det, model, None
    except (CheckpointError, KeyError, ValueError, ImportError, *BUILD_ERRORS) as e:
        det = locals().get("det") or Detection("unknown", "unknown")
        return det, None, str(e).splitlines()[0] if str(e) else type(e).__name__

