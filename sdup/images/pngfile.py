"""PNG pixels through pypng, for what Pillow cannot do: 16-bit colour (Pillow reads it at 8 bits and cannot write
it). pypng writes neither text nor ICC chunks: ``encode_png`` adds them to its output. Everything else about PNG
(8-bit files, metadata on reading) is Pillow's."""
from __future__ import annotations

import io
import itertools
import zlib
from pathlib import Path

import numpy as np
import png  # pypng

PARAMETERS_KEY = "parameters"  # PNG text keyword holding the JSON parameters


def itxt_chunk(keyword: str, text: str) -> tuple[bytes, bytes]:
    """An iTXt chunk: keyword, NUL, not compressed, method 0, no language tag, no translated keyword, UTF-8 text."""
    return b"iTXt", keyword.encode("latin-1") + b"\x00\x00\x00\x00\x00" + text.encode("utf-8")


def iccp_chunk(profile: bytes) -> tuple[bytes, bytes]:
    """An iCCP chunk: profile name, NUL, compression method 0 (zlib), the compressed profile."""
    return b"iCCP", b"ICC profile\x00\x00" + zlib.compress(profile)


def encode_png(arr: np.ndarray, text: dict[str, str] | None = None, icc_profile: bytes | None = None) -> bytes:
    """(H, W, C) uint8 / uint16 array, C in 1-4 -> PNG bytes (pypng: filter 0, zlib level 6), with ``text`` as
    UTF-8 iTXt chunks and ``icc_profile`` as an iCCP chunk, both before the image data."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    h, w, c = arr.shape
    depth = 16 if arr.dtype == np.uint16 else 8
    rows = arr.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1).view(np.uint8)
    buf = io.BytesIO()
    png.Writer(w, h, greyscale=c < 3, alpha=c in (2, 4), bitdepth=depth, compression=6).write_packed(buf, rows)
    chunks = list(png.Reader(bytes=buf.getvalue()).chunks())  # IHDR, IDAT..., IEND
    extra = [iccp_chunk(icc_profile)] if icc_profile else []
    extra += [itxt_chunk(key, value) for key, value in (text or {}).items()]
    out = io.BytesIO()
    png.write_chunks(out, chunks[:1] + extra + chunks[1:])
    return out.getvalue()


def check_image_data(path: Path, limit: int) -> None:
    """Inflate the image data in bounded pieces and refuse more than ``limit`` bytes: pypng inflates each IDAT
    chunk in one call (a to-do in its source), so a small crafted file could otherwise unpack to gigabytes."""
    inflate, total = zlib.decompressobj(), 0
    for kind, body in png.Reader(filename=str(path)).chunks():  # CRCs checked
        data = body if kind == b"IDAT" else b""
        while data:
            total += len(inflate.decompress(data, 1 << 20))
            if total > limit:
                raise ValueError("more image data than the size in its header")
            data = inflate.unconsumed_tail


def _read_png(path: Path) -> np.ndarray | None:
    """Decode an 8 / 16-bit grey / RGB(A) PNG (interlaced or not) -> (H, W, C) uint8 / uint16 through pypng;
    None for what Pillow handles (palette, fewer than 8 bits). Transparency keys (tRNS) and sBIT are ignored."""
    w, h, rows, info = png.Reader(filename=str(path)).read()  # the header only: rows are decoded when iterated
    if "palette" in info or info["bitdepth"] not in (8, 16):
        return None
    planes, wide = info["planes"], info["bitdepth"] == 16
    check_image_data(path, h * (w * planes * (2 if wide else 1) + 2) + 8)  # rows + filter bytes, Adam7 included
    arr = np.empty((h, w * planes), np.uint16 if wide else np.uint8)
    n = 0
    for n, row in enumerate(itertools.islice(rows, h), 1):
        arr[n - 1] = np.frombuffer(row, arr.dtype)
    if n != h:
        raise ValueError(f"truncated image data ({n} of {h} rows)")
    return arr.reshape(h, w, planes)
