"""Colour correction of super-resolved images against their low-resolution input (StableSR's AdaIN and wavelet fixes).

    out = color_fix(content, reference, mode="wavelet")   # "none" | "adain" | "wavelet"

``content`` is the model's output, ``reference`` the low-resolution input (any size: it is resized to the
content's size with bicubic interpolation, antialiased when shrinking, as StableSR compares against the
upsampled LR).  Both are RGB tensors (B, 3, H, W) or (3, H, W), **in [-1, 1]** as in StableSR's sampling
scripts, which apply the fix to the decoded samples before the final clamp (the pipelines call it there);
the result is not clamped.  The functions are exactly those of ``IceClear/StableSR scripts/wavelet_color_fix.py``
(from ``pkuliyi2015/sd-webui-stablesr``):

* **AdaIN** (``adain``): per image and channel, mean mu and std s = sqrt(var_unbiased + 1e-5) over H*W;
  out = (x - mu_x) / s_x * s_ref + mu_ref.  Because of the 1e-5 the result depends (very slightly) on the
  value range: [-1, 1] here, like StableSR's samplers (its standalone PIL helper works in [0, 1]).
* **Wavelet** (``wavelet``): blur_r = depthwise 3x3 [[1,2,1],[2,4,2],[1,2,1]]/16 with dilation r and replicate
  padding r; five levels r = 1, 2, 4, 8, 16: high += x - blur_r(x), x = blur_r(x); low = the final x.
  out = high(content) + low(reference).  Linear, so it gives the same result in [0, 1] or [-1, 1]
  (``color_fix(x, x) == x`` up to rounding, and a constant colour shift of the reference shifts the output
  by exactly that constant).

RGB only: a 4-channel (RGBA) tensor raises ``ValueError`` -- split the alpha channel off first and put it back
after (sd-webui-stablesr#30, #49).  Computations run in float32 at least (fp16 inputs are upcast) and the
result has the content's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
COLOR_FIX_MODES = ("none", "adain", "wavelet")
ADAIN_EPS = 1e-5
WAVELET_LEVELS = 5
_KERNEL = ((1.0, 2.0, 1.0), (2.0, 4.0, 2.0), (1.0, 2.0, 1.0))  # / 16


def _as_batch(x: Tensor, what: str) -> tuple[Tensor, bool]:
    """(3, H, W) or (B, 3, H, W) -> (B, 3, H, W) float (>= fp32), and whether a batch dim was added."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim not in (3, 4):
        raise ValueError(f"{what} must be a float image tensor (3, H, W) or (B, 3, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    squeeze = x.ndim == 3
    x = x[None] if squeeze else x
    c = x.shape[1]
    if c == 4:
        raise ValueError(f"{what} has 4 channels (RGBA): colour correction works on RGB only; split the alpha "
                         "channel off (image[:, :3], image[:, 3:]) and re-attach it afterwards")
    if c != 3:
        raise ValueError(f"{what} must have 3 (RGB) channels, got {c}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x, squeeze


def calc_mean_std(x: Tensor, eps: float = ADAIN_EPS) -> tuple[Tensor, Tensor]:
    """Per image and channel (mean, sqrt(unbiased variance + eps)), shaped (B, C, 1, 1)."""
    b, c = x.shape[:2]
    flat = x.reshape(b, c, -1)
    if flat.shape[-1] < 2:
        raise ValueError("AdaIN needs at least 2 pixels (unbiased variance)")
    return flat.mean(dim=2).reshape(b, c, 1, 1), (flat.var(dim=2) + eps).sqrt().reshape(b, c, 1, 1)


def adain(content: Tensor, reference: Tensor, eps: float = ADAIN_EPS) -> Tensor:
    """AdaIN colour transfer: the content normalised per channel, then given the reference's mean / std.
    Both (B, C, H, W); the sizes may differ (statistics only)."""
    mu_c, s_c = calc_mean_std(content, eps)
    mu_r, s_r = calc_mean_std(reference, eps)
    return (content - mu_c) / s_c * s_r + mu_r


def wavelet_blur(x: Tensor, radius: int) -> Tensor:
    """Depthwise 3x3 binomial blur with dilation ``radius`` and replicate padding ``radius`` (same size out)."""
    c = x.shape[1]
    kernel = torch.tensor(_KERNEL, dtype=x.dtype, device=x.device) / 16
    kernel = kernel[None, None].repeat(c, 1, 1, 1)
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(x, kernel, groups=c, dilation=radius)


def wavelet_decomposition(x: Tensor, levels: int = WAVELET_LEVELS) -> tuple[Tensor, Tensor]:
    """(high, low) with high + low == x: high sums the band-pass residues of blurs at radius 1, 2, 4, ...,
    low is the final blur."""
    high = torch.zeros_like(x)
    low = x
    for i in range(levels):
        low = wavelet_blur(x, 2 ** i)
        high = high + (x - low)
        x = low
    return high, low


def wavelet_reconstruction(content: Tensor, reference: Tensor, levels: int = WAVELET_LEVELS) -> Tensor:
    """High frequencies of ``content`` + low frequencies of ``reference`` (same size)."""
    high, _ = wavelet_decomposition(content, levels)
    _, low = wavelet_decomposition(reference, levels)
    return high + low


def match_size(reference: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic resize of (B, C, h, w) to ``size`` = (H, W) (antialiased when shrinking); unchanged if equal."""
    if tuple(reference.shape[-2:]) == tuple(size):
        return reference
    shrink = size[0] < reference.shape[-2] or size[1] < reference.shape[-1]
    return F.interpolate(reference, size=tuple(size), mode="bicubic", align_corners=False, antialias=shrink)


def color_fix(content: Tensor, reference: Tensor, mode: str = "wavelet") -> Tensor:
    """Give ``content`` the colours of ``reference`` (see the module docstring).

    content: (B, 3, H, W) or (3, H, W) in [-1, 1]; reference: the same batch (or batch 1, shared), any size
    (bicubic-resized to H x W). mode: "none" (content returned unchanged), "adain" or "wavelet".
    Returns a tensor like ``content`` (not clamped).
    """
    key = str(mode).strip().lower() if mode is not None else "none"
    if key not in COLOR_FIX_MODES:
        raise ValueError(f"unknown colour fix {mode!r} (choose from {', '.join(COLOR_FIX_MODES)})")
    x, squeeze = _as_batch(content, "content")
    if key == "none":
        _as_batch(reference, "reference")  # same validation, so a bad reference never passes silently
        return content
    ref, _ = _as_batch(reference, "reference")
    ref = ref.to(x.device, x.dtype)
    if ref.shape[0] != x.shape[0]:
        if ref.shape[0] != 1:
            raise ValueError(f"reference batch {ref.shape[0]} does not match content batch {x.shape[0]}")
        ref = ref.expand(x.shape[0], -1, -1, -1)
    ref = match_size(ref, tuple(x.shape[-2:]))
    out = adain(x, ref) if key == "adain" else wavelet_reconstruction(x, ref)
    out = out.to(content.dtype)
    return out[0] if squeeze else out
