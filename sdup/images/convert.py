"""Pixels between tensors, numpy arrays and PIL images: (C, H, W) float in [0, 1] on the torch side, (H, W, C)
uint8 / uint16 on the file side; the EXIF orientation; the alpha channel's resize."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _check_image(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image tensor (C, H, W) with C in 1, 3, 4, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    return x.detach().float().cpu().clamp(0, 1)


def to_uint(x: Tensor, bits: int = 8) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, C) uint8 / uint16, rounded to nearest (diffusers ``numpy_to_pil``; CompVis'
    script truncates instead, at most 1/255 darker)."""
    x = _check_image(x)
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    top = (1 << bits) - 1
    return (x.permute(1, 2, 0).double() * top).round().numpy().astype(np.uint8 if bits == 8 else np.uint16)


def from_uint16(arr: np.ndarray) -> Tensor:
    """(H, W, C) uint16, C in 1-4 (grey, grey + alpha, RGB, RGBA) -> (3 or 4, H, W) float32 in [0, 1]."""
    t = torch.from_numpy(arr.astype(np.float32) / 65535.0).permute(2, 0, 1)
    if t.shape[0] in (1, 2):  # grey (+ alpha)
        t = torch.cat([t[:1].expand(3, -1, -1), t[1:]])
    return t.contiguous()


def tensor_to_pil(x: Tensor, bits: int = 8):
    """(C, H, W) in [0, 1] -> PIL image: RGB / RGBA / L for 8 bits, "I;16" for one channel at 16 bits
    (Pillow has no 16-bit colour mode: write those with ``save_png(..., bits=16)``)."""
    from PIL import Image
    a = to_uint(x, bits)
    if bits == 16:
        if a.shape[2] != 1:
            raise ValueError("Pillow has no 16-bit RGB mode: use save_png(image, path, bits=16)")
        return Image.fromarray(a[:, :, 0])  # uint16 2-D -> "I;16"
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)  # uint8 -> L / RGB / RGBA


def pil_to_tensor(img, alpha: bool = False) -> Tensor:
    """PIL image (any common mode) -> (3, H, W) float32 in [0, 1] (``alpha=True``: (4, H, W) when the image has
    transparency). Grey images are repeated to 3 channels; 16-bit greys ("I;16", "I") are divided by 65535,
    float images ("F") are taken as [0, 1]. Without ``alpha`` the transparency is dropped (colour kept as stored)."""
    mode = img.mode
    has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info)
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img, dtype=np.float64) / 65535.0
    elif mode == "F":
        a = np.asarray(img, dtype=np.float64)
    else:
        target = "RGBA" if has_alpha else "RGB"
        a = np.asarray(img.convert(target), dtype=np.float64) / 255.0
    t = torch.from_numpy(np.ascontiguousarray(a)).float().clamp(0, 1)
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if t.shape[0] == 4 and not alpha:
        t = t[:3]
    return t.contiguous()


_FLIPS = {1: (), 2: (2,), 3: (1, 2), 4: (1,), 5: (), 6: (2,), 7: (1, 2), 8: (1,)}  # after the transpose of 5-8


def orient(t: Tensor, orientation: int) -> Tensor:
    """(C, H, W) as an EXIF orientation (1-8) says it is shown: the table of Pillow's ``ImageOps.exif_transpose``,
    applied to a tensor because 16-bit colour images have no PIL mode to run Pillow's on."""
    if orientation not in _FLIPS:
        return t
    if orientation >= 5:
        t = t.transpose(1, 2)
    return t.flip(_FLIPS[orientation]).contiguous() if _FLIPS[orientation] else t.contiguous()


def upscale_alpha(alpha: Tensor, size: tuple[int, int]) -> Tensor:
    """(1, h, w) alpha -> (1, H, W): bicubic (not antialiased), clamped to [0, 1]."""
    if tuple(alpha.shape[-2:]) == tuple(size):
        return alpha
    a = F.interpolate(alpha[None].float(), size=tuple(size), mode="bicubic", align_corners=False)
    return a[0].clamp(0, 1)
