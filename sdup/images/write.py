"""Writing output images: each format is encoded to bytes in memory, then written once, atomically
(``sdup.fileio.atomic_write``: a temporary name of its own, renamed at the end), so an interrupted run never leaves
a half-written output, no library writes to the file itself (libtiff would print its own lines on a failure), and
every failure is one ``ImageWriteError`` line naming the output.

    PNG   8 bits: Pillow; 16 bits: pypng (``pngfile.encode_png``)       parameters: iTXt "parameters" (UTF-8 JSON)
    TIFF  8 bits: Pillow (deflate); 16 bits: tifffile (deflate)         parameters: ImageDescription (ASCII JSON)
    JPEG  8 bits, quality 95, no alpha (dropped, with a note)           parameters: EXIF ImageDescription (ASCII JSON)
    WebP  8 bits, lossless, alpha kept                                  parameters: EXIF ImageDescription (ASCII JSON)
The input's ICC profile goes into every format (iCCP, tag 34675, APP2, ICCP). ``metadata.read_parameters`` reads the
parameters back from any of them; no sidecar files are written.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import torch

from ..fileio import atomic_write
from .convert import pil_to_tensor, tensor_to_pil, to_uint, upscale_alpha
from .errors import ImageWriteError, UpscaleIOError, first_line, note
from .metadata import EXIF_IMAGE_DESCRIPTION, _params_text
from .pngfile import PARAMETERS_KEY, encode_png
from .tiff import encode_tiff16

Tensor = torch.Tensor
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
FORMATS = ("png", "jpg", "webp", "tiff")
EXT_FORMAT = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp", ".tif": "tiff", ".tiff": "tiff"}
FORMAT_EXT = {"png": ".png", "jpg": ".jpg", "webp": ".webp", "tiff": ".tif"}
JPEG_QUALITY = 95


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
    own = EXT_FORMAT.get(path.suffix.lower(), "png")
    return own if can_write(own) else "png"


def _pillow_bytes(image: Tensor, **options) -> bytes:
    buf = io.BytesIO()
    tensor_to_pil(image, 8).save(buf, **options)
    return buf.getvalue()


def _exif(text: str | None) -> dict:
    from PIL import Image
    if text is None:
        return {}
    exif = Image.Exif()
    exif[EXIF_IMAGE_DESCRIPTION] = text
    return {"exif": exif.tobytes()}


def encode(image: Tensor, fmt: str, bits: int, parameters: dict | None, icc_profile: bytes | None) -> bytes:
    """(C, H, W) in [0, 1] -> the bytes of a ``fmt`` file (the table in the module docstring)."""
    icc = {"icc_profile": icc_profile} if icc_profile else {}
    if fmt == "png" and bits == 16:
        text = _params_text(parameters)
        return encode_png(to_uint(image, 16), {PARAMETERS_KEY: text} if text else {}, icc_profile)
    if fmt == "png":
        from PIL.PngImagePlugin import PngInfo
        info = PngInfo()
        if parameters is not None:
            info.add_itxt(PARAMETERS_KEY, _params_text(parameters))
        return _pillow_bytes(image, format="PNG", pnginfo=info, **icc)
    text = _params_text(parameters, ascii_only=True)
    if fmt == "tiff" and bits == 16:
        return encode_tiff16(to_uint(image, 16), text, icc_profile)
    if fmt == "tiff":
        return _pillow_bytes(image, format="TIFF", compression="tiff_deflate", **icc,
                             **({} if text is None else {"description": text}))
    if fmt == "jpg":
        return _pillow_bytes(image, format="JPEG", quality=JPEG_QUALITY, **icc, **_exif(text))
    return _pillow_bytes(image, format="WEBP", lossless=True, **icc, **_exif(text))


def write_bytes(path: Path, data: Callable[[], bytes]) -> Path:
    """``data()`` written to ``path`` atomically; any failure (the encoder's included) -> ``ImageWriteError``."""
    if path.is_dir():
        raise ImageWriteError(f"{path}: is a folder, cannot write the image there")
    try:
        content = data()
        return atomic_write(path, lambda tmp: tmp.write_bytes(content))
    except (OSError, ValueError, MemoryError) as e:
        if isinstance(e, ImageWriteError):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise ImageWriteError(f"{path}: cannot write the image ({reason})") from None


def write_image(path: str | Path, rgb: Tensor, alpha: Tensor | None = None, *, bits: int = 8,
                parameters: dict | None = None, fmt: str | None = None, icc_profile: bytes | None = None,
                warn: Callable[[str], None] = note) -> Path:
    """Write ``rgb`` (3, H, W) in [0, 1] (+ ``alpha`` (1, h, w), resized to H x W) atomically, with ``parameters``
    and ``icc_profile``. ``fmt``: png | jpg | webp | tiff (default: from the file extension)."""
    path = Path(path)
    fmt = fmt or EXT_FORMAT.get(path.suffix.lower())
    if fmt not in FORMATS:
        raise UpscaleIOError(f"{path}: cannot tell the output format from the extension")
    rgb = rgb.detach().float().cpu().clamp(0, 1)
    image = rgb
    if alpha is not None and fmt == "jpg":
        warn(f"{path.name}: JPEG has no alpha channel; the transparency is dropped (use png, webp or tiff)")
    elif alpha is not None:
        image = torch.cat([rgb, upscale_alpha(alpha.detach().float().cpu(), tuple(rgb.shape[-2:]))])
    if bits == 16 and fmt in ("jpg", "webp"):
        warn(f"{path.name}: {fmt} holds 8 bits per channel; the 16-bit input is written at 8 bits")
    bits = 16 if bits == 16 and fmt in ("png", "tiff") else 8
    return write_bytes(path, lambda: encode(image, fmt, bits, parameters, icc_profile))


def save_png(image, path: str | Path, parameters: dict | None = None, bits: int = 8) -> Path:
    """Write ``image`` ((C, H, W) tensor in [0, 1] or a PIL image) as PNG with ``parameters`` as JSON in an
    iTXt chunk named "parameters". ``bits=16`` writes 16 bits per channel. Atomic (temporary file + rename)."""
    if not isinstance(image, Tensor):
        image = pil_to_tensor(image, alpha=True)
    return write_bytes(Path(path), lambda: encode(image, "png", 16 if bits == 16 else 8, parameters, None))
