"""The latents file: what ``scripts/txt2img.py --latents-out`` writes and the x2 latent upscaler reads.

A safetensors file with one tensor ``latents`` (B, 4, h, w) float32, the scaled SD latents (``txt2img(...).latents``),
and string metadata: ``scale_factor`` (SD's 0.18215), ``parameters`` (the generation's JSON), ``seeds``, ``prompt``
and ``negative_prompt`` (JSON).  Written atomically (``fileio.atomic_write``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..fileio import atomic_write

SD_SCALE_FACTOR = 0.18215   # the SD 1.x / 2.x latent space; SDXL's 0.13025 is another one


def write_latents(path: str | Path, latents: torch.Tensor, parameters: dict, scale_factor: float) -> None:
    """Scaled latents (B, 4, h, w) and the parameters of the run that made them -> ``path``, atomically."""
    p = parameters
    meta = {"parameters": json.dumps(p), "scale_factor": str(scale_factor), "seeds": json.dumps(p.get("seeds")),
            "prompt": json.dumps(p.get("prompt", p.get("prompts"))),
            "negative_prompt": json.dumps(p.get("negative_prompt", p.get("negative_prompts")))}
    tensors = {"latents": latents.float().contiguous()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_latents(path: str | Path) -> tuple[torch.Tensor, dict]:
    """A latents file -> (latents float32, metadata with ``parameters`` decoded). A file whose ``scale_factor`` is
    not SD's 0.18215 (e.g. SDXL's 0.13025) is refused: the x2 model only knows the SD 1.x / 2.x latent space."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if "latents" not in f.keys():
            raise ValueError(f"{path}: no 'latents' tensor (expected a file from scripts/txt2img.py --latents-out)")
        latents = f.get_tensor("latents").float()
    if "scale_factor" in meta and abs(float(meta["scale_factor"]) - SD_SCALE_FACTOR) > 1e-6:
        raise ValueError(f"{path}: latents scaled by {meta['scale_factor']}, the x2 latent upscaler needs SD 1.x / 2.x "
                         f"latents scaled by {SD_SCALE_FACTOR} (SDXL latents: decode them and pass the image instead)")
    if "parameters" in meta:
        try:
            meta["parameters"] = json.loads(meta["parameters"])
        except ValueError:
            pass
    return latents, meta
