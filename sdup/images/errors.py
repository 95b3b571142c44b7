"""The errors and notes of image file I/O: one line each, naming the file."""
from __future__ import annotations

import logging
import os
import struct
import sys
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import png  # pypng

# what Pillow, pypng, tifffile and zlib raise on damaged or crafted files (UnidentifiedImageError is an OSError)
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, png.Error, KeyError,
                 IndexError, TypeError, ZeroDivisionError, OverflowError, MemoryError, RecursionError)


class UpscaleIOError(ValueError):
    """A user-facing file problem (one line)."""


class ImageWriteError(UpscaleIOError, OSError):
    """An output that could not be written (full disk, file-size limit, a folder in the way, an encoder that
    refused): one line naming the output. Also an ``OSError``, as the failure underneath it was one."""


_CONTROL = {**{c: f"\\x{c:02x}" for c in (*range(32), 0x7F, 0x85)}, 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t",
            0x2028: "\\u2028", 0x2029: "\\u2029"}


def one_line(text) -> str:
    """``text`` as one printable line: control characters escaped (a file name may hold a newline), and the bytes
    of a file name that are not UTF-8 (surrogates) as ``\\udcxx``."""
    return str(text).translate(_CONTROL).encode("utf-8", "backslashreplace").decode("utf-8")


def note(msg: str) -> None:
    print(f"note: {one_line(msg)}", file=sys.stderr)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


@contextmanager
def _quiet():
    """The decoders' own chatter about a damaged file off: Pillow's warnings, tifffile's log lines and libtiff's
    lines, which it prints from C to file descriptor 2 (Pillow installs no libtiff handler)."""
    logger = logging.getLogger("tifffile")
    disabled, logger.disabled = logger.disabled, True
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
        logger.disabled = disabled


@contextmanager
def decoding(path: Path):
    """Quiet decoders; any failure -> ``UpscaleIOError`` "PATH: not a readable image (first line of the reason)"."""
    try:
        with _quiet():
            yield
    except UpscaleIOError:
        raise
    except DECODE_ERRORS as e:
        raise UpscaleIOError(f"{path}: not a readable image ({first_line(e)})") from None
