"""Reading checkpoint files: state dicts, or only their key -> shape tables (no tensor data).

Formats: ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` (torch pickles, read with ``weights_only=True``,
weights possibly nested under ``state_dict``), ``.safetensors`` (shapes come from the JSON header
alone), diffusers folders (one sub-folder per component), and key manifests (``{key: [shape, dtype]}``
JSON, as in ``shared/manifests``).
"""
from __future__ import annotations

import json
import os
import re
import struct
import zipfile
from pathlib import Path

import torch

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


class CheckpointError(ValueError):
    """A file that cannot be read as a checkpoint; the message is one line naming what was found."""


def safetensors_header(path: str | Path) -> tuple[dict, dict]:
    """(tensors {name: {"dtype", "shape", "data_offsets"}}, metadata) from the header only."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 * 2**20):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} does not fit a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e.__class__.__name__})") from None
    meta = header.pop("__metadata__", None) or {}
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file (needs {8 + n + end} bytes, has {size})")
    return header, meta


def _load_failure(e: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in plain words."""
    text = str(e)
    blocked = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", text)
    if blocked:
        return (f"holds Python objects ({blocked.group(1) or blocked.group(2)}) besides tensors, which sdup refuses "
                f"to unpickle for safety: it is not a plain weights checkpoint")
    if isinstance(e, (EOFError, zipfile.BadZipFile)) or "zip archive" in text or "EOF" in text:
        return "truncated or corrupt torch checkpoint (the file ends early or its zip structure is damaged)"
    return "not a loadable checkpoint (neither a torch zip / pickle of tensors nor a safetensors file)"


def _torch_load(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # pickle / zip errors come in many types and torch's text suggests the unsafe way out
        raise CheckpointError(f"{path}: {_load_failure(e)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model_ema"), dict):  # k-diffusion: {"model_ema": {...}, ...}
        obj = obj["model_ema"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: torch file holds a {type(obj).__name__}, not a state dict of tensors")
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """One weight file -> flat {key: tensor}."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        safetensors_header(path)  # clear errors for truncated/corrupt files
        from safetensors.torch import load_file
        return load_file(str(path))
    if path.suffix in TORCH_SUFFIXES:
        return _torch_load(path)
    raise CheckpointError(f"{path}: unsupported file type {path.suffix!r} (expected .safetensors, .ckpt, .pt, .pth, .bin)")


def read_shapes(path: str | Path) -> tuple[dict[str, tuple], dict]:
    """{key: shape} and metadata, without reading tensor data where the format allows it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        header, meta = safetensors_header(path)
        return {k: tuple(v["shape"]) for k, v in header.items()}, meta
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a key manifest ({e.__class__.__name__})") from None
        if not isinstance(data, dict) or not all(isinstance(v, list) and v and isinstance(v[0], list) for v in data.values()):
            raise CheckpointError(f"{path}: JSON is not a key manifest ({{key: [shape, dtype]}})")
        return {k: tuple(v[0]) for k, v in data.items()}, {"manifest": "1"}
    sd = read_state_dict(path)  # torch pickles: mmap'd where possible, so data is not read
    return {k: tuple(v.shape) for k, v in sd.items()}, {}


def component_file(folder: Path, component: str, variant: str | None = None) -> Path | None:
    """The weight file of a diffusers component folder (safetensors preferred, fp16 variants optional)."""
    sub = folder / component
    if not sub.is_dir():
        return None
    variants = [f".{variant}"] if variant else ["", ".fp16"]
    for v in variants:
        for stem in WEIGHT_NAMES:
            for ext in (".safetensors", ".bin"):
                p = sub / f"{stem}{v}{ext}"
                if p.exists():
                    return p
    return None


def component_config(folder: Path, component: str) -> dict | None:
    p = Path(folder) / component / "config.json"
    return json.loads(p.read_text()) if p.exists() else None


def is_diffusers_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / c / "config.json").exists() for c in ("unet", "vae", "text_encoder"))


def is_vae_folder(path: str | Path) -> bool:
    """A bare diffusers VAE folder (``config.json`` of an ``AutoencoderKL`` + its weights at the top level), e.g.
    stabilityai/sd-vae-ft-mse."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("_class_name") == "AutoencoderKL"
    except ValueError:
        return False


def describe_path(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        return f"folder {path} ({', '.join(sorted(p.name for p in path.iterdir())[:8]) or 'empty'})"
    return f"{path} ({os.path.getsize(path)} bytes)"
