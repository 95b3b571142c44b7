"""What the page shows of a result: the input scaled up to the output's size (nearest or bicubic, the reference a
reader compares against), the output, and the same corner of both zoomed in, side by side.  A latents file (x2) has
no input image: its reference is the output taken down to the low-res size and back up the same way."""
from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F

from ..cli.inputs import LATENT_EXTENSIONS
from ..images import read_image, tensor_to_pil

REFERENCES = ("bicubic", "nearest")
ZOOMS = (2, 4, 8)
GAP = 4  # pixels between the two crops
SHOWN_WIDTH = 320  # each crop is enlarged (by a whole factor, nearest) to at least this wide


def shown(path: Path, max_pixels: int | None = None):
    """An image file as an 8-bit RGB PIL image (alpha dropped: the page compares colours)."""
    return tensor_to_pil(read_image(path, max_pixels).rgb, bits=8)


def reference(input_path: Path, size: tuple[int, int], mode: str, max_pixels: int | None = None,
              scale: float = 4, output: Path | None = None):
    """The input scaled up to ``size`` (H, W) by ``mode`` (``REFERENCES``), as an 8-bit RGB PIL image; a latents
    file's stand-in: ``output`` at 1/``scale`` (area average), scaled up the same way."""
    if mode not in REFERENCES:
        raise ValueError(f"reference must be one of {', '.join(REFERENCES)}, got {mode!r}")
    if input_path.suffix.lower() in LATENT_EXTENSIONS:
        out = read_image(output, None).rgb[None]
        x = F.interpolate(out, size=(round(size[0] / scale), round(size[1] / scale)), mode="area")
    else:
        x = read_image(input_path, max_pixels).rgb[None]
    kw = {"align_corners": False, "antialias": False} if mode == "bicubic" else {}
    up = F.interpolate(x, size=size, mode=mode, **kw).clamp(0, 1)
    return tensor_to_pil(up[0], bits=8)


def crop_box(size: tuple[int, int], centre: tuple[float, float], zoom: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of 1/zoom of the image around ``centre`` (x, y in 0..1), kept inside."""
    w, h = size
    cw, ch = max(1, round(w / zoom)), max(1, round(h / zoom))
    left = min(max(0, round(centre[0] * w - cw / 2)), w - cw)
    top = min(max(0, round(centre[1] * h - ch / 2)), h - ch)
    return left, top, left + cw, top + ch


def zoomed_pair(before, after, centre: tuple[float, float], zoom: int):
    """The same box of 1/``zoom`` of ``before`` and ``after`` (PIL images of one size), enlarged by a whole factor
    (nearest: every pixel visible; at least ``zoom`` and ``SHOWN_WIDTH`` wide), side by side with a white gap."""
    from PIL import Image
    box = crop_box(after.size, centre, zoom)
    w, h = box[2] - box[0], box[3] - box[1]
    k = max(zoom, -(-SHOWN_WIDTH // w))
    a = before.crop(box).resize((w * k, h * k), Image.NEAREST)
    b = after.crop(box).resize(a.size, Image.NEAREST)
    out = Image.new("RGB", (a.width * 2 + GAP, a.height), "white")
    out.paste(a, (0, 0))
    out.paste(b, (a.width + GAP, 0))
    return out

