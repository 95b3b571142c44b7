"""The errors and notes of image file I/O: one line each, naming the file."""
from __future__ import annotations

import sys


class UpscaleIOError(ValueError):
    """A user-facing file problem (one line)."""


class ImageWriteError(UpscaleIOError, OSError):
    """An output that could not be written (full disk, file-size limit, a folder in the way, an encoder that
    refused): one line naming the output. Also an ``OSError``, as the failure underneath it was one."""


def note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__
