"""Reading checkpoint files: state dicts, or only their key -> shape tables (no tensor data).

Formats: ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` (torch pickles, read with ``weights_only=True``,
weights possibly nested under ``state_dict``), ``.safetensors`` (shapes come from the JSON header
alone), diffusers folders (one sub-folder per component), and key manifests (``{key: [shape, dtype]}``
JSON, as in ``shared/manifests``).
"""
from __future__ import annotations

import json
import math
import mmap
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


SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "C64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                        "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
                        "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1}  # bytes per element (the sub-byte F4 / F6 are refused)


def _short(value, limit: int = 80) -> str:
    """A crafted header's value as a message shows it: its repr, cut (a header may hold megabytes in one field)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _header_problem(header, data_bytes: int) -> str | None:
    """What is wrong with a parsed safetensors header (None: nothing): field types, dtypes, shapes and byte
    ranges that fit the data, as the format requires."""
    if not isinstance(header, dict):
        return f"the header is a JSON {type(header).__name__}, not an object"
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        return "__metadata__ is not a string -> string table"
    for name, t in header.items():
        if name == "__metadata__":
            continue
        name = _short(name)
        if not isinstance(t, dict) or not isinstance(t.get("dtype"), str) or t["dtype"] not in SAFETENSORS_ITEMSIZE:
            return f"tensor {name} has no known dtype"
        shape, offsets = t.get("shape"), t.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            return f"tensor {name} has shape {_short(shape)}, not a list of sizes"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"tensor {name} has data_offsets {_short(offsets)}, not [begin, end]"
        need = math.prod(shape) * SAFETENSORS_ITEMSIZE[t["dtype"]]
        if offsets[1] - offsets[0] != need:
            return (f"tensor {name} ({t['dtype']} {_short(shape)}) needs {need} bytes, its data_offsets span "
                    f"{offsets[1] - offsets[0]}")
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if end > data_bytes:
        return f"truncated safetensors file (its tensors need {end} data bytes, it has {data_bytes})"
    return None


def safetensors_header(path: str | Path) -> tuple[dict, dict]:
    """(tensors {name: {"dtype", "shape", "data_offsets"}}, metadata) from the header only, checked."""
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
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e.__class__.__name__})") from None
    problem = _header_problem(header, size - 8 - n)
    if problem:
        prefix = "" if problem.startswith("truncated") else "corrupt safetensors header: "
        raise CheckpointError(f"{path}: {prefix}{problem}")
    meta = header.pop("__metadata__", None) or {}
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
    """One weight file -> flat {key: tensor}. Safetensors files and torch zip checkpoints come back memory-mapped:
    a tensor takes memory only once its data is read (``Sources`` gives it back after a conversion)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        safetensors_header(path)  # clear errors for truncated/corrupt files
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - whatever the reader rejects that the header check let through
            raise CheckpointError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0]})") from None
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
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
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


# ------------------------------------------------------------------------------------------------
# giving the memory of converted-from tensors back during a load

def _file_ranges(path: Path) -> list[tuple[int, int]]:
    """The address ranges where this process maps ``path`` (empty where /proc is not there)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    real = os.path.realpath(path)
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == real:
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _drop_pages(addr: int, nbytes: int) -> None:
    """Unmap the resident pages wholly inside [addr, addr + nbytes) of a file mapping from this process
    (``madvise(MADV_DONTNEED)``: the file keeps the data; a later read maps it in again)."""
    import ctypes
    page = mmap.PAGESIZE
    lo, hi = -(-addr // page) * page, (addr + nbytes) // page * page
    if hi > lo and hasattr(mmap, "MADV_DONTNEED"):
        libc = ctypes.CDLL(None)
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)


class Sources:
    """The tensors a load read from files, given back one by one as they are converted, so that a load holds
    the converted model plus about one tensor. ``add`` registers a file's state dict; ``release(t)``, after
    ``t`` was converted into something that does not share its memory: pages of a memory-mapped file
    (safetensors, torch zip) leave this process, memory read in (legacy pickles) is freed once every
    tensor on that storage was released. Tensors never registered (a caller's own state dict) are left alone."""

    def __init__(self):
        self._pending: dict[int, tuple[torch.Tensor, bool]] = {}  # id -> (tensor, file-mapped)
        self._users: dict[int, int] = {}  # storage address -> registered tensors not yet released (read-in memory)

    def add(self, sd: dict, path: str | Path) -> dict:
        ranges = _file_ranges(Path(path))
        for t in sd.values():
            if t.device.type != "cpu" or t.untyped_storage().nbytes() == 0:
                continue
            mapped = any(lo <= t.data_ptr() < hi for lo, hi in ranges)
            self._pending[id(t)] = (t, mapped)
            if not mapped:
                key = t.untyped_storage().data_ptr()
                self._users[key] = self._users.get(key, 0) + 1
        return sd

    def release(self, t: torch.Tensor) -> None:
        entry = self._pending.pop(id(t), None)
        if entry is None:
            return
        t, mapped = entry
        if mapped:
            _drop_pages(t.data_ptr(), t.numel() * t.element_size())
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        self._users[key] -= 1
        if self._users[key] == 0 and storage.resizable():
            del self._users[key]
            storage.resize_(0)
