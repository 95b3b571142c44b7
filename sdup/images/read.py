"""Reading input images: RGB in [0, 1], the alpha channel split off, the bit depth, the ICC profile.

EXIF orientation is applied to every format and depth (the output carries no orientation tag). 16-bit sources stay
16-bit: PNG through pypng (``pngfile``), TIFF through tifffile (``tiff``); everything else through Pillow. The size
is checked against ``max_pixels`` from the header, before any pixel is decoded. Whatever a crafted or damaged file
makes a decoder raise ends in one ``UpscaleIOError`` line naming the file.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .convert import from_uint16, orient, pil_to_tensor
from .errors import UpscaleIOError, decoding
from .metadata import exif_orientation, rgb_icc_profile
from .pngfile import _read_png
from .tiff import read_tiff16

Tensor = torch.Tensor
MAX_PIXELS = 100_000_000  # inputs above 100 megapixels are refused unless the caller raises the limit (--max-pixels)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"



@dataclass
class InputImage:
    path: Path
    rgb: Tensor                  # (3, H, W) float32 in [0, 1]
    alpha: Tensor | None = None  # (1, H, W) float32 in [0, 1]
    bits: int = 8                # 8 or 16 (source precision, kept on output where the format allows)
    notes: list = field(default_factory=list)
    icc_profile: bytes | None = None  # an RGB ICC profile, carried to the output

    @property
    def size(self) -> tuple[int, int]:  # (H, W)
        return tuple(self.rgb.shape[-2:])


def _png_bit_depth(head: bytes) -> int | None:
    if head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR":
        return head[24]
    return None


def check_pixels(path: Path, width: int, height: int, max_pixels: int | None) -> None:
    """Refuse an image above ``max_pixels`` (None or 0: no limit) before its pixels are decoded."""
    if max_pixels and width * height > max_pixels:
        raise UpscaleIOError(f"{path}: {width}x{height} is {width * height / 1e6:.0f} megapixels, above the limit of "
                             f"{max_pixels / 1e6:g} (pass --max-pixels {width * height} to allow it)")


@contextmanager
def open_image(path: Path, max_pixels: int | None = MAX_PIXELS):
    """``PIL.Image.open`` with ``check_pixels`` in place of Pillow's own decompression-bomb limit (a traceback)."""
    from PIL import Image
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as img:
            check_pixels(path, *img.size, max_pixels)
            yield img
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _header(path: Path) -> bytes:
    if not path.is_file():
        raise UpscaleIOError(f"{path}: no such image file")
    try:
        with open(path, "rb") as fh:
            return fh.read(32)
    except OSError as e:
        raise UpscaleIOError(f"{path}: cannot read ({e.strerror or e})") from None


def _deep_pixels(path: Path, img, head: bytes, notes: list):
    """(H, W, C) uint16 for a 16-bit PNG or TIFF, else None (Pillow decodes it)."""
    if img.format == "PNG" and _png_bit_depth(head) == 16:
        return _read_png(path)
    if img.format == "TIFF":
        bps = img.tag_v2.get(258)
        if 16 in (bps if isinstance(bps, (tuple, list)) else (bps,)):
            arr = read_tiff16(path, stored_size(img)[::-1])
            if arr is None:
                notes.append(f"{path.name}: 16-bit TIFF read at 8 bits (its compression or colour model needs the "
                             f"imagecodecs package)")
            return arr
    return None


def stored_size(img) -> tuple[int, int]:
    """(W, H) as stored: Pillow gives a TIFF's size turned by its EXIF orientation already (it turns the pixels
    when it loads them), so the TIFF tags say what is stored."""
    if img.format == "TIFF":
        return int(img.tag_v2.get(256, img.size[0])), int(img.tag_v2.get(257, img.size[1]))
    return img.size


def read_image(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> InputImage:
    """Read one image (see the module docstring). Unreadable files raise ``UpscaleIOError`` (one line)."""
    path = Path(path)
    head = _header(path)
    notes: list[str] = []
    with decoding(path), open_image(path, max_pixels) as img:
        if getattr(img, "is_animated", False):
            notes.append(f"{path.name}: animated ({img.n_frames} frames): only the first frame is upscaled")
        icc = rgb_icc_profile(img, notes)
        deep = _deep_pixels(path, img, head, notes)
        if deep is not None:
            t, bits = from_uint16(deep), 16
        else:
            bits = 16 if img.mode.startswith("I;16") or img.mode == "I" else 8
            img.load()
            t = pil_to_tensor(img, alpha=True)
        t = orient(t, exif_orientation(img))
    return _split(path, t, bits, notes, icc)


def _split(path: Path, t: Tensor, bits: int, notes: list, icc: bytes | None = None) -> InputImage:
    t = t.float()
    alpha = t[3:4].contiguous() if t.shape[0] == 4 else None
    if alpha is not None and bool((alpha >= 1).all()):
        alpha = None  # fully opaque: nothing to carry
    return InputImage(path, t[:3].contiguous(), alpha, bits, notes, icc)


def load_image(path: str | Path, alpha: bool = False, max_pixels: int | None = MAX_PIXELS) -> Tensor:
    """Read an image file -> (3, H, W) float32 in [0, 1] (``alpha=True``: (4, H, W) when it has transparency),
    16-bit files at full precision, the EXIF orientation applied. Unreadable files raise ``UpscaleIOError``
    (a ``ValueError``) with one line."""
    img = read_image(path, max_pixels)
    return torch.cat([img.rgb, img.alpha]) if alpha and img.alpha is not None else img.rgb


def image_size(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """(H, W) after EXIF orientation, from the header alone: no pixel is decoded (a PNG's EXIF is read only when it
    comes before the pixel data, where Pillow finds it without decoding)."""
    path = Path(path)
    with decoding(path), open_image(path, max_pixels) as img:
        w, h = stored_size(img)
        header_exif = img.format != "PNG" or "exif" in img.info
        if header_exif and exif_orientation(img) >= 5:
            w, h = h, w
    return h, w
