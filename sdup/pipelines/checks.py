"""Checks of the pipelines' arguments, with clear ValueErrors: numbers, input images, padding to a multiple.

    check_int / check_finite            an option that must be an int >= lo / a finite number
    check_guidance                      a classifier-free guidance scale: finite and within +-MAX_GUIDANCE
    check_steps                         a number of sampler steps: 1..MAX_STEPS
    check_images(image, image_range)    tensors / PIL images -> (B, 3, h, w) float32 in [-1, 1] on the CPU
    pad_to_multiple(x, m, pad_mode)     pad bottom / right to multiples of m ("replicate" | "reflect"), or say why not
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..images import pil_to_tensor

Tensor = torch.Tensor


def check_int(name: str, value, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def check_finite(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


MAX_STEPS = 999  # one step per timestep of the models' 1000-step chain (DDIM's limit; 1000 would repeat a sigma)


def check_steps(value) -> int:
    """A number of sampler steps: 1..MAX_STEPS (more would only cost time, and memory for the grid)."""
    if check_int("steps", value) > MAX_STEPS:
        raise ValueError(f"steps must be in 1..{MAX_STEPS}, got {value!r}")
    return value


MAX_GUIDANCE = 100.0  # far above any useful scale (7-10); 1e308 would overflow the guided output to inf


def check_guidance(value) -> float:
    """A guidance scale: a finite number in -MAX_GUIDANCE..MAX_GUIDANCE (larger ones only overflow: a black image)."""
    check_finite("guidance", value)
    if abs(value) > MAX_GUIDANCE:
        raise ValueError(f"guidance must be in {-MAX_GUIDANCE:g}..{MAX_GUIDANCE:g} (useful scales are about 1-15), "
                         f"got {value!r}")
    return value


def check_images(image, image_range=(0, 1)) -> Tensor:
    """Tensor (3, h, w) / (B, 3, h, w) / list of them, or PIL image(s) -> (B, 3, h, w) float32 in [-1, 1]."""
    lo_hi = tuple(float(v) for v in image_range)
    if lo_hi not in ((0.0, 1.0), (-1.0, 1.0)):
        raise ValueError(f"image_range must be (0, 1) or (-1, 1), got {image_range!r}")
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError("no input image")
    tensors = []
    for it in items:
        if hasattr(it, "mode") and hasattr(it, "convert"):  # PIL
            if it.mode in ("RGBA", "LA", "PA"):
                raise ValueError("the input image has an alpha channel: the upscalers work on RGB; split the alpha off "
                                 "(and upscale it separately) first")
            tensors.append(pil_to_tensor(it)[None] * 2 - 1)
            continue
        if not isinstance(it, Tensor) or not it.is_floating_point() or it.ndim not in (3, 4):
            raise ValueError("image must be a float tensor (3, h, w) / (B, 3, h, w), a PIL image, or a list of them; "
                             f"got {tuple(it.shape) if isinstance(it, Tensor) else type(it).__name__}")
        t = it[None] if it.ndim == 3 else it
        if t.shape[1] == 4:
            raise ValueError("the input image has 4 channels (RGBA): the upscalers work on RGB; split the alpha "
                             "channel off (image[:, :3]) and upscale it separately")
        if t.shape[1] != 3:
            raise ValueError(f"the input image must have 3 (RGB) channels, got {t.shape[1]}")
        t = t.float()  # no detach: gradients flow from the output back to the input
        if t.numel():
            mn, mx = float(t.detach().min()), float(t.detach().max())
            if mn < lo_hi[0] - 0.01 or mx > lo_hi[1] + 0.01:
                hint = " (pass image_range=(-1, 1) for [-1, 1] input)" if mn >= -1.01 and mx <= 1.01 else ""
                raise ValueError(f"image values span [{mn:.3g}, {mx:.3g}], outside image_range {lo_hi}{hint}")
        tensors.append(t * 2 - 1 if lo_hi == (0.0, 1.0) else t)
    if len({tuple(t.shape[1:]) for t in tensors}) != 1:
        sizes = sorted({tuple(t.shape[2:]) for t in tensors})
        raise ValueError(f"all input images must have the same size, got {sizes}")
    x = torch.cat([t.cpu() for t in tensors])
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"empty input image {tuple(x.shape[-2:])}")
    return x


PAD_MODES = ("replicate", "reflect")


def pad_to_multiple(x: Tensor, m: int, pad_mode: str | None, what: str = "image") -> tuple[Tensor, tuple[int, int]]:
    """Pad bottom / right to multiples of m; returns (padded, (pad_h, pad_w))."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if not ph and not pw:
        return x, (0, 0)
    if pad_mode is None:
        raise ValueError(f"the {what} is {h}x{w}, but this model needs height and width that are multiples of "
                         f"{m} (the model downsamples it by {m}); crop / resize it, or pass "
                         f"pad_mode='replicate' or 'reflect' to pad and crop the output back")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES} or None, got {pad_mode!r}")
    if pad_mode == "reflect" and (ph >= h or pw >= w):
        raise ValueError(f"reflect padding of a {h}x{w} image by ({ph}, {pw}) is impossible; use pad_mode='replicate'")
    return F.pad(x, (0, pw, 0, ph), mode=pad_mode), (ph, pw)
