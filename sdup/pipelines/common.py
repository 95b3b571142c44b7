"""Image files of the pipelines: PNG with the generation parameters, images <-> tensors.

Images
    tensor_to_pil / pil_to_tensor     (C, H, W) float in [0, 1] <-> PIL (8-bit; 16-bit for one channel, "I;16")
    load_image(path)                  any image Pillow reads -> (3, H, W) in [0, 1]; 16-bit PNGs keep 16 bits
    save_png(image, path, parameters, bits=8|16)
                                      PNG with the generation parameters as an iTXt chunk "parameters" (JSON),
                                      written to a temporary name and renamed (never a half-written file);
                                      16-bit RGB PNGs are encoded here (Pillow has no 16-bit RGB mode)
    read_png_parameters(path)         the JSON back, or None
The prompts are in ``conditioning``, seeds in ``seeds``, argument checks in ``checks``, decoding in ``decoding``,
``Result`` and the dtype names in ``result``.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..fileio import atomic_write  # noqa: F401  (re-exported: pipelines write through it)

Tensor = torch.Tensor
PARAMETERS_KEY = "parameters"  # PNG text keyword holding the JSON parameters

# ------------------------------------------------------------------------------------------------
# files


def output_paths(out: str | Path, n: int, stem: str = "sample", suffix: str = ".png",
                 names: Sequence[str] | None = None) -> list[Path]:
    """Where ``n`` images go. ``out`` ending in ``suffix`` is a file: used as is for one image,
    ``name-0.png, name-1.png, ...`` for more. Anything else is a folder (created when written): files
    ``{names[i]}.png`` or ``{stem}-{i}.png``, numbered ``-1``, ``-2``, ... instead of overwriting existing files."""
    out = Path(out)
    if out.suffix.lower() == suffix:
        if out.is_dir():
            raise ValueError(f"{out}: is a folder, but the name looks like a {suffix} file")
        return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder (give a folder or a {suffix} file name)")
    paths: list[Path] = []
    for i in range(n):
        base = names[i] if names is not None else f"{stem}-{i}"
        p, k = out / f"{base}{suffix}", 0
        while p.exists() or p in paths:
            k += 1
            p = out / f"{base}-{k}{suffix}"
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------------
# tensors <-> PIL


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


def load_image(path: str | Path, alpha: bool = False) -> Tensor:
    """Read an image file -> (3, H, W) float32 in [0, 1] (``alpha=True``: (4, H, W) when it has transparency).
    16-bit PNGs are decoded here at full precision (Pillow would truncate 16-bit colour to 8 bits); JPEG EXIF
    orientation is applied. Unreadable files raise ``ValueError`` with one line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such image file")
    try:
        with open(path, "rb") as fh:
            is_png = fh.read(8) == _PNG_SIG
        png = _read_png(path) if is_png else None
    except (ValueError, zlib.error, struct.error) as e:
        raise ValueError(f"{path}: not a readable PNG ({e})") from None
    if png is not None and png.dtype == np.uint16:
        t = torch.from_numpy(png.astype(np.float32) / 65535.0).permute(2, 0, 1)
        if t.shape[0] in (1, 2):  # grey (+ alpha)
            t = torch.cat([t[:1].expand(3, -1, -1), t[1:]])
        return (t if alpha else t[:3]).contiguous()
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({str(e).splitlines()[0]})") from None
    return pil_to_tensor(img, alpha=alpha)


# ------------------------------------------------------------------------------------------------
# PNG files with parameters


def _json(parameters: dict) -> str:
    return json.dumps(parameters, ensure_ascii=False, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def save_png(image, path: str | Path, parameters: dict | None = None, bits: int = 8) -> Path:
    """Write ``image`` ((C, H, W) tensor in [0, 1] or a PIL image) as PNG with ``parameters`` as JSON in an
    iTXt chunk named "parameters". ``bits=16`` writes 16 bits per channel. Atomic (temporary file + rename)."""
    path = Path(path)
    text = None if parameters is None else _json(parameters)
    if bits == 16:
        if not isinstance(image, Tensor):
            image = pil_to_tensor(image, alpha=True)
        arr = to_uint(image, 16)
        return atomic_write(path, lambda tmp: tmp.write_bytes(encode_png(arr, {PARAMETERS_KEY: text} if text else {})))
    from PIL.PngImagePlugin import PngInfo
    img = tensor_to_pil(image, 8) if isinstance(image, Tensor) else image
    info = PngInfo()
    if text is not None:
        info.add_itxt(PARAMETERS_KEY, text)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=info))


def read_png_parameters(path: str | Path) -> dict | None:
    """The JSON written by ``save_png`` (None when the file has no "parameters" text)."""
    from PIL import Image
    with Image.open(path) as img:
        text = getattr(img, "text", {}).get(PARAMETERS_KEY) or img.info.get(PARAMETERS_KEY)
    return None if text is None else json.loads(text)


_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> channels (grey, RGB, grey+alpha, RGBA)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(arr: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """(H, W, C) uint8 / uint16 array, C in 1-4 -> PNG bytes (filter 0, zlib level 6, UTF-8 iTXt chunks)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    h, w, c = arr.shape
    ctype = {1: 0, 3: 2, 2: 4, 4: 6}[c]
    depth = 16 if arr.dtype == np.uint16 else 8
    rows = arr.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1).view(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    out = [_PNG_SIG, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))]
    for key, value in (text or {}).items():  # keyword, 0, compression flag 0, method 0, language "", translated ""
        out.append(_chunk(b"iTXt", key.encode("latin-1") + b"\x00\x00\x00\x00\x00" + value.encode("utf-8")))
    out += [_chunk(b"IDAT", zlib.compress(raw, 6)), _chunk(b"IEND", b"")]
    return b"".join(out)


def _read_png(path: Path) -> np.ndarray | None:
    """Decode a non-interlaced 8/16-bit grey/RGB(A) PNG -> (H, W, C) uint8/uint16; None for what Pillow should
    handle (palette, < 8 bits, interlaced)."""
    data = path.read_bytes()
    pos, idat, hdr = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if len(body) != n:
            raise ValueError("truncated chunk")
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + n
    if hdr is None:
        raise ValueError("no IHDR chunk")
    w, h, depth, ctype, _, _, interlace = hdr
    if depth not in (8, 16) or ctype not in _CHANNELS or interlace:
        return None
    bpp = _CHANNELS[ctype] * depth // 8
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    if raw.size < h * (1 + w * bpp):
        raise ValueError("truncated image data")
    px = unfilter_png(raw[: h * (1 + w * bpp)].reshape(h, 1 + w * bpp), w, bpp)
    if depth == 16:
        return px.reshape(h, w, -1).view(">u2").astype(np.uint16)
    return px.reshape(h, w, -1)


def unfilter_png(rows: np.ndarray, width: int, bpp: int) -> np.ndarray:
    """Undo the PNG per-row filters (None, Sub, Up, Average, Paeth) -> (H, W, bpp) uint8.

    Each byte depends on its left (a), upper (b) and upper-left (c) neighbours, so pixels on one anti-diagonal
    row + column = d are independent: the loop runs over H + W - 1 diagonals, each vectorised."""
    h = rows.shape[0]
    ftype = rows[:, 0].astype(np.int32)
    if ftype.size and ftype.max() > 4:
        raise ValueError(f"unknown PNG filter type {int(ftype.max())}")
    f = rows[:, 1:].reshape(h, width, bpp).astype(np.int32)
    out = np.zeros((h + 1, width + 1, bpp), np.int32)  # zero row/column in front: the out-of-image neighbours
    all_rows = np.arange(h)
    for d in range(h + width - 1):
        r = all_rows[max(0, d - width + 1): min(h, d + 1)]
        p = d - r
        a, b, c = out[r + 1, p], out[r, p + 1], out[r, p]
        pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        ft = ftype[r][:, None]
        pred = np.select([ft == 0, ft == 1, ft == 2, ft == 3], [0, a, b, (a + b) >> 1], paeth)
        out[r + 1, p + 1] = (f[r, p] + pred) & 255
    return out[1:, 1:].astype(np.uint8)
