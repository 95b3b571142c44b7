"""Image files for the upscaler CLI (model-independent): reading and writing images with their parameters.

    img = read_image(path)          # .rgb (3, H, W) in [0, 1], .alpha (1, H, W) or None, .bits 8 | 16
    write_image(path, rgb, alpha, bits=img.bits, parameters={...})    # atomic: temporary name + rename

Which inputs and outputs a command names: ``sdup.cli.inputs``.

Reading
    RGB in [0, 1] plus the alpha channel split off (upscaled separately: bicubic, clamped -- the models work on
    RGB only). EXIF orientation is applied (Pillow's ``exif_transpose``; the output carries no orientation tag).
    16-bit sources are detected and kept at 16 bits: PNG (own decoder, ``common.load_image``), TIFF grey
    (Pillow "I;16") and uncompressed 16-bit RGB / RGBA TIFF (decoded here: Pillow truncates those to 8 bits;
    a compressed 16-bit colour TIFF is read through Pillow at 8 bits, with a note).
Writing
    PNG: 8 / 16 bits, parameters as JSON in the iTXt chunk "parameters" (``common.save_png``).
    TIFF: 8-bit through Pillow; 16-bit written by this module (baseline uncompressed TIFF, 16 bits per sample,
    RGB or RGBA with unassociated alpha) because Pillow has no 16-bit colour mode. Parameters (JSON) in the
    ImageDescription tag (270).
    JPEG / WebP: 8 bits (16-bit inputs are rounded, with a note); parameters (ASCII JSON) in the EXIF
    ImageDescription tag (0x010E). JPEG has no alpha: it is dropped with a note. WebP keeps alpha.
    No sidecar files are written. ``read_parameters(path)`` reads the JSON back from any of these.
    Every write goes through ``sdup.fileio.atomic_write`` (a temporary name of its own, renamed at the end), so an
    interrupted run never leaves a half-written output, and of two runs writing one output the last to finish wins.
"""
from __future__ import annotations

import json
import struct
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .common import atomic_write, load_image, pil_to_tensor, read_png_parameters, save_png, to_uint

Tensor = torch.Tensor
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
FORMATS = ("png", "jpg", "webp", "tiff")
_EXT_FORMAT = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp", ".tif": "tiff", ".tiff": "tiff"}
_FORMAT_EXT = {"png": ".png", "jpg": ".jpg", "webp": ".webp", "tiff": ".tif"}
JPEG_QUALITY = 95
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_ORIENTATION = 0x0112
MAX_PIXELS = 100_000_000  # inputs above 100 megapixels are refused unless the caller raises the limit (--max-pixels)


class UpscaleIOError(ValueError):
    """A user-facing file problem (one line)."""


def note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


# ------------------------------------------------------------------------------------------------
# output formats


def can_write(fmt: str) -> bool:
    if fmt == "webp":
        from PIL import features
        return bool(features.check("webp"))
    return fmt in FORMATS


def output_format(path: Path, fmt: str | None) -> str:
    """The format written for input ``path``: ``fmt`` or the input's own, PNG for what we cannot write."""
    if fmt is not None:
        fmt = fmt.lower()
        fmt = {"jpeg": "jpg", "tif": "tiff"}.get(fmt, fmt)
        if fmt not in FORMATS:
            raise UpscaleIOError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if not can_write(fmt):
            raise UpscaleIOError(f"this Pillow cannot write {fmt}")
        return fmt
    own = _EXT_FORMAT.get(path.suffix.lower(), "png")
    return own if can_write(own) else "png"


# ------------------------------------------------------------------------------------------------
# reading


@dataclass
class InputImage:
    path: Path
    rgb: Tensor                  # (3, H, W) float32 in [0, 1]
    alpha: Tensor | None = None  # (1, H, W) float32 in [0, 1]
    bits: int = 8                # 8 or 16 (source precision, kept on output where the format allows)
    notes: list = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:  # (H, W)
        return tuple(self.rgb.shape[-2:])


def _png_bit_depth(head: bytes) -> int | None:
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return head[24]
    return None


def _read_tiff16(img) -> np.ndarray | None:
    """An uncompressed, chunky (interleaved), strip-organised 16-bit 3/4-sample TIFF -> (H, W, C) uint16, else None."""
    try:
        tags = img.tag_v2
        bps = tags.get(258)
        bps = tuple(bps) if isinstance(bps, (tuple, list)) else (bps,)
        spp = int(tags.get(277, 1))
        if spp not in (3, 4) or set(bps) != {16} or int(tags.get(259, 1)) != 1 or int(tags.get(284, 1)) != 1 \
                or int(tags.get(262, 2)) != 2 or 273 not in tags:
            return None
        w, h = img.size
        offsets, counts = tags[273], tags[279]
        offsets = offsets if isinstance(offsets, (tuple, list)) else (offsets,)
        counts = counts if isinstance(counts, (tuple, list)) else (counts,)
        endian = ">" if tags._endian == ">" else "<"  # noqa: SLF001 (Pillow's IFD knows the byte order)
        with open(img.filename, "rb") as fh:
            data = b""
            for o, n in zip(offsets, counts):
                fh.seek(int(o))
                data += fh.read(int(n))
        need = w * h * spp * 2
        if len(data) < need:
            return None
        return np.frombuffer(data[:need], dtype=endian + "u2").reshape(h, w, spp).astype(np.uint16)
    except Exception:  # noqa: BLE001 -- anything odd: let Pillow read it at 8 bits
        return None


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation (1-8) applied to an (H, W, C) array, as ``ImageOps.exif_transpose``."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: a.transpose(1, 0, 2)[:, ::-1],
           7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: a.transpose(1, 0, 2)[::-1]}
    return np.ascontiguousarray(ops[orientation](arr)) if orientation in ops else arr


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


def read_image(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> InputImage:
    """Read one image (see the module docstring). Unreadable files raise ``UpscaleIOError`` (one line)."""
    path = Path(path)
    head = _header(path)
    notes: list[str] = []
    try:
        if _png_bit_depth(head) is not None:
            bits = 16 if _png_bit_depth(head) == 16 else 8
            with open_image(path, max_pixels):  # the size check; Pillow's own limit stays off while decoding
                t = load_image(path, alpha=True)
            return _split(path, t, bits, notes)
        from PIL import ImageOps, UnidentifiedImageError
        try:
            with open_image(path, max_pixels) as img:
                if getattr(img, "is_animated", False):
                    notes.append(f"{path.name}: animated ({img.n_frames} frames): only the first frame is upscaled")
                if img.format == "TIFF":
                    arr = _read_tiff16(img)
                    if arr is not None:
                        orientation = int(img.getexif().get(EXIF_ORIENTATION, 1) or 1)
                        arr = _orient(arr, orientation)
                        t = torch.from_numpy(arr.astype(np.float32) / 65535.0).permute(2, 0, 1).contiguous()
                        return _split(path, t, 16, notes)
                    bps = img.tag_v2.get(258)
                    if (16 in bps if isinstance(bps, (tuple, list)) else bps == 16) and not img.mode.startswith("I"):
                        notes.append(f"{path.name}: compressed 16-bit colour TIFF read at 8 bits")
                bits = 16 if img.mode.startswith("I;16") or img.mode == "I" else 8
                img = ImageOps.exif_transpose(img)
                img.load()
                t = pil_to_tensor(img, alpha=True)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise UpscaleIOError(f"{path}: not a readable image ({_first_line(e)})") from None
        return _split(path, t, bits, notes)
    except UpscaleIOError:
        raise
    except ValueError as e:
        raise UpscaleIOError(str(e).splitlines()[0]) from None


def _split(path: Path, t: Tensor, bits: int, notes: list) -> InputImage:
    t = t.float()
    alpha = t[3:4].contiguous() if t.shape[0] == 4 else None
    if alpha is not None and bool((alpha >= 1).all()):
        alpha = None  # fully opaque: nothing to carry
    return InputImage(path, t[:3].contiguous(), alpha, bits, notes)


# ------------------------------------------------------------------------------------------------
# writing


def upscale_alpha(alpha: Tensor, size: tuple[int, int]) -> Tensor:
    """(1, h, w) alpha -> (1, H, W): bicubic (not antialiased), clamped to [0, 1]."""
    if tuple(alpha.shape[-2:]) == tuple(size):
        return alpha
    a = F.interpolate(alpha[None].float(), size=tuple(size), mode="bicubic", align_corners=False)
    return a[0].clamp(0, 1)


def _params_text(parameters: dict | None, ascii_only: bool = False) -> str | None:
    if parameters is None:
        return None
    return json.dumps(parameters, ensure_ascii=ascii_only,
                      default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def encode_tiff16(arr: np.ndarray, description: str | None = None) -> bytes:
    """(H, W, C) uint16, C in 1, 3, 4 -> baseline little-endian uncompressed TIFF bytes (one strip)."""
    h, w, c = arr.shape
    pixels = arr.astype("<u2").tobytes()
    desc = (description.encode("ascii", "backslashreplace") + b"\x00") if description is not None else None
    entries = []  # (tag, type, count, value bytes)
    short = lambda v: struct.pack("<H", v) + b"\x00\x00"  # noqa: E731  (SHORT value, left-justified)
    long_ = lambda v: struct.pack("<I", v)  # noqa: E731
    n_tags = 10 + (1 if c == 4 else 0) + (1 if desc else 0)
    ifd_off = 8
    extra_off = ifd_off + 2 + 12 * n_tags + 4
    extra = b""

    def add_extra(data: bytes) -> int:
        nonlocal extra
        off = extra_off + len(extra)
        extra += data + (b"\x00" if len(data) % 2 else b"")
        return off
    bps_value = short(16) if c == 1 else long_(add_extra(struct.pack("<" + "H" * c, *([16] * c))))
    desc_value = long_(add_extra(desc)) if desc and len(desc) > 4 else (desc.ljust(4, b"\x00") if desc else None)
    data_off = extra_off + len(extra)
    entries += [(256, 4, 1, long_(w)), (257, 4, 1, long_(h)), (258, 3, c, bps_value), (259, 3, 1, short(1)),
                (262, 3, 1, short(1 if c == 1 else 2))]
    if desc:
        entries.append((270, 2, len(desc), desc_value))
    entries += [(273, 4, 1, long_(data_off)), (277, 3, 1, short(c)), (278, 4, 1, long_(h)),
                (279, 4, 1, long_(len(pixels)))]
    if c == 4:
        entries.append((338, 3, 1, short(2)))  # ExtraSamples: unassociated alpha
    entries.append((284, 3, 1, short(1)))
    entries.sort(key=lambda e: e[0])
    assert len(entries) == n_tags, (len(entries), n_tags)
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", t, ty, n) + v for t, ty, n, v in entries) \
        + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", ifd_off) + ifd + extra + pixels


def write_image(path: str | Path, rgb: Tensor, alpha: Tensor | None = None, *, bits: int = 8,
                parameters: dict | None = None, fmt: str | None = None,
                warn: Callable[[str], None] = note) -> Path:
    """Write ``rgb`` (3, H, W) in [0, 1] (+ ``alpha`` (1, h, w), resized to H x W) atomically.
    ``fmt``: png | jpg | webp | tiff (default: from the file extension)."""
    path = Path(path)
    fmt = fmt or _EXT_FORMAT.get(path.suffix.lower())
    if fmt not in FORMATS:
        raise UpscaleIOError(f"{path}: cannot tell the output format from the extension")
    rgb = rgb.detach().float().cpu().clamp(0, 1)
    image = rgb
    if alpha is not None:
        image = torch.cat([rgb, upscale_alpha(alpha.detach().float().cpu(), tuple(rgb.shape[-2:]))])
    if fmt == "png":
        return save_png(image, path, parameters, bits=16 if bits == 16 else 8)
    if fmt == "tiff" and bits == 16:
        data = encode_tiff16(to_uint(image, 16), _params_text(parameters, ascii_only=True))
        return atomic_write(path, lambda tmp: tmp.write_bytes(data))
    if bits == 16:
        warn(f"{path.name}: {fmt} holds 8 bits per channel; the 16-bit input is written at 8 bits")
    from PIL import Image
    if fmt == "jpg" and alpha is not None:
        warn(f"{path.name}: JPEG has no alpha channel; the transparency is dropped (use png, webp or tiff)")
        image = rgb
    img = Image.fromarray(to_uint(image, 8))
    text = _params_text(parameters, ascii_only=True)
    if fmt == "tiff":
        kw = dict(format="TIFF", compression="tiff_deflate")
        if text is not None:
            kw["description"] = text
    else:
        kw = dict(format="JPEG", quality=JPEG_QUALITY) if fmt == "jpg" else dict(format="WEBP", lossless=True)
        if text is not None:
            exif = Image.Exif()
            exif[EXIF_IMAGE_DESCRIPTION] = text
            kw["exif"] = exif.tobytes()
    return atomic_write(path, lambda tmp: img.save(tmp, **kw))


def read_parameters(path: str | Path) -> dict | None:
    """The JSON parameters of an output (PNG iTXt "parameters"; TIFF / JPEG / WebP ImageDescription), or None."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head == b"\x89PNG\r\n\x1a\n":
        return read_png_parameters(path)
    with open_image(Path(path), None) as img:  # outputs may be larger than any input limit
        text = img.getexif().get(EXIF_IMAGE_DESCRIPTION)
        if text is None and img.format == "TIFF":
            text = img.tag_v2.get(270)
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


# ------------------------------------------------------------------------------------------------
# sizes from the header


def image_size(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """(H, W) after EXIF orientation, from the header alone: no pixel is decoded (a PNG's EXIF is read only when it
    comes before the pixel data, where Pillow finds it without decoding)."""
    path = Path(path)
    from PIL import UnidentifiedImageError
    try:
        with open_image(path, max_pixels) as img:
            w, h = img.size
            header_exif = img.format != "PNG" or "exif" in img.info
            if header_exif and int(img.getexif().get(EXIF_ORIENTATION, 1) or 1) in (5, 6, 7, 8):
                w, h = h, w
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UpscaleIOError(f"{path}: not a readable image ({_first_line(e)})") from None
    return h, w


__all__ = ["IMAGE_EXTENSIONS", "FORMATS", "UpscaleIOError", "InputImage", "output_format", "read_image", "write_image",
           "upscale_alpha", "read_parameters", "encode_tiff16", "image_size", "MAX_PIXELS", "check_pixels", "open_image"]
