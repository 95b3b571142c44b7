"""What an image file carries besides its pixels: the generation parameters (JSON), the ICC profile, the EXIF
orientation.

    format   parameters                                     ICC profile
    PNG      iTXt chunk "parameters" (UTF-8 JSON)           iCCP chunk
    TIFF     ImageDescription tag 270 (ASCII JSON)          tag 34675
    JPEG     EXIF ImageDescription 0x010E (ASCII JSON)      APP2 segments
    WebP     EXIF ImageDescription 0x010E (ASCII JSON)      ICCP chunk
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from .errors import decoding, first_line
from .pngfile import PARAMETERS_KEY

EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_ORIENTATION = 0x0112


def _params_text(parameters: dict | None, ascii_only: bool = False) -> str | None:
    """The parameters as JSON (numpy / torch values as lists, anything else as its ``str``)."""
    if parameters is None:
        return None
    text = json.dumps(parameters, ensure_ascii=ascii_only,
                      default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name's bytes that are not UTF-8 (surrogates): as JSON escapes, read back exactly
        return _params_text(parameters, ascii_only=True)
    return text


def _json_object(text) -> dict | None:
    """``text`` as a JSON object; None when it is absent, not JSON or not an object (tampered with, or not ours)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, TypeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _open(path: Path):
    from PIL import Image
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # outputs may be larger than any input limit
    try:
        return Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _description(path: Path, header_only: bool = False):
    """The parameters text of any format (PNG text chunks past the image data included unless ``header_only``: then
    nothing is decoded, and sdup's own chunks, which come before the image data, are still found)."""
    with _open(path) as img:
        if img.format == "PNG" and header_only:
            return img.info.get(PARAMETERS_KEY)
        if img.format == "PNG":
            return getattr(img, "text", {}).get(PARAMETERS_KEY) or img.info.get(PARAMETERS_KEY)
        text = img.getexif().get(EXIF_IMAGE_DESCRIPTION)
        if text is None and img.format == "TIFF":
            text = img.tag_v2.get(270)
        return text


def read_parameters(path: str | Path, header_only: bool = False) -> dict | None:
    """The JSON parameters of an output (PNG iTXt "parameters"; TIFF / JPEG / WebP ImageDescription), or None when
    it has none; a file that cannot be read raises ``UpscaleIOError`` (one line). ``header_only``: no pixel is
    decoded (a PNG's text chunks after its image data are not seen)."""
    path = Path(path)
    with decoding(path):
        return _json_object(_description(path, header_only))


def read_png_parameters(path: str | Path) -> dict | None:
    """The JSON written by ``save_png`` (None when the file has no "parameters" text)."""
    return read_parameters(path)


def exif_orientation(img) -> int:
    """A PIL image's EXIF orientation, 1 (as stored) unless it is an integer in 2-8."""
    value = img.getexif().get(EXIF_ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def rgb_icc_profile(img, notes: list) -> bytes | None:
    """A PIL image's ICC profile, kept when an RGB output can carry it: it must parse (LittleCMS, through Pillow's
    ImageCms) and describe RGB. A grey or broken profile is left out, with a note."""
    icc = img.info.get("icc_profile")
    if not icc:
        return None
    from PIL import ImageCms
    try:
        space = ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.xcolor_space.strip()
    except (OSError, ValueError, TypeError, ImageCms.PyCMSError) as e:
        notes.append(f"{Path(img.filename).name}: its ICC profile is unreadable ({first_line(e)}): not carried over")
        return None
    if space != "RGB":
        notes.append(f"{Path(img.filename).name}: its ICC profile is for {space or 'another'} colour, the output is "
                     f"RGB: not carried over")
        return None
    return bytes(icc)
