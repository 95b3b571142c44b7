"""16-bit TIFF through tifffile: Pillow has no 16-bit colour mode (it reads such files at 8 bits and cannot write
them). 8-bit TIFF is Pillow's."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tifffile

_PHOTOMETRIC = (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB)


def encode_tiff16(arr: np.ndarray, description: str | None = None, icc_profile: bytes | None = None) -> bytes:
    """(H, W, C) uint16, C in 1, 3, 4 -> TIFF bytes (deflate; grey, RGB or RGBA with unassociated alpha), with
    ``description`` (ASCII) in ImageDescription (270) and ``icc_profile`` in InterColorProfile (34675)."""
    c = arr.shape[2]
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr if c > 1 else arr[:, :, 0], photometric="rgb" if c >= 3 else "minisblack",
                     extrasamples=("unassalpha",) if c == 4 else None, compression="zlib",
                     description=description, metadata=None, iccprofile=icc_profile)
    return buf.getvalue()


def read_tiff16(path: Path, size: tuple[int, int]) -> np.ndarray | None:
    """The first image of a 16-bit grey / RGB(A) TIFF of ``size`` (H, W) -> (H, W, C) uint16; None when tifffile
    cannot decode it here (another colour model, or a compression that needs the ``imagecodecs`` package)."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        if page.dtype != np.uint16 or page.photometric not in _PHOTOMETRIC:
            return None
        try:
            arr = page.asarray()
        except KeyError:  # "<COMPRESSION.LZW: 5> requires the 'imagecodecs' package"
            return None
        axes = page.axes
    if axes == "YX":
        arr = arr[:, :, None]
    elif axes == "SYX":  # planar configuration 2: one plane per sample
        arr = arr.transpose(1, 2, 0)
    elif axes != "YXS":
        return None
    if arr.shape[:2] != tuple(size):
        raise ValueError(f"its image is {arr.shape[1]}x{arr.shape[0]}, its header says {size[1]}x{size[0]}")
    return np.ascontiguousarray(arr)
