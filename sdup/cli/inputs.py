"""Which inputs a command names and where their outputs go, checked before any work.

    inputs = expand_inputs(["photos/", "scans/*.tif", "one.png"])     # files, folders (non-recursive), globs
    outputs = plan_outputs(inputs, "out/", scale=4, fmt=None)          # out/<stem>_x4.<ext>
    items = plan_items(inputs, upscaler, max_pixels)                  # sizes from the headers, latents files split

Inputs
    A folder contributes its image files (extensions ``IMAGE_EXTENSIONS``, case-insensitive, sorted, not
    recursive); a glob (``*``, ``?``, ``[``) its matching image files; a file name is taken as is (a non-image
    fails when read). Duplicates are dropped. Nothing at all -> ``UpscaleIOError``.  A latents file
    (``.safetensors`` of scripts/txt2img.py --latents-out) is one input per sample, for an upscaler that reads
    latents (``Upscaler.read_latents``).
Outputs
    ``-o NAME.ext`` (an image extension, not an existing folder) is a file, allowed for one input only;
    anything else is a folder (created on write) holding ``<stem>_x<scale>.<ext>``. ``ext``: ``--format``
    (png | jpg | webp | tiff) or the input's own extension; inputs Pillow cannot write here (BMP, or WebP when
    Pillow lacks WebP) become PNG. Two inputs mapping to one name get ``-1``, ``-2`` suffixes. An existing
    output is replaced (atomically) unless ``--skip-existing``, which skips an input whose output name exists.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from safetensors import safe_open

from ..images import (EXT_FORMAT, FORMAT_EXT, IMAGE_EXTENSIONS, UpscaleIOError, can_write, image_size, output_format,
                      read_image)
from .arguments import fail

_GLOB_CHARS = set("*?[")
LATENT_EXTENSIONS = (".safetensors",)  # latents files of scripts/txt2img.py --latents-out


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def expand_inputs(specs: Sequence[str | Path]) -> list[Path]:
    """Files, folders (their image files, not recursive) and globs -> image paths, in order, without duplicates."""
    if not specs:
        raise UpscaleIOError("no input given (files, folders or globs)")
    out: list[Path] = []
    for spec in specs:
        s = str(spec)
        p = Path(s)
        if p.is_dir():
            found = sorted((q for q in p.iterdir() if q.is_file() and _is_image_name(q)), key=lambda q: q.name)
            if not found:
                raise UpscaleIOError(f"{p}: folder has no image files ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)})")
        elif p.is_file():
            found = [p]
        elif _GLOB_CHARS & set(s):
            found = [Path(q) for q in sorted(glob.glob(s)) if Path(q).is_file() and _is_image_name(Path(q))]
            if not found:
                raise UpscaleIOError(f"{s}: nothing matches (no image files)")
        else:
            raise UpscaleIOError(f"{s}: no such file or folder")
        out.extend(found)
    seen, unique = set(), []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique




def _is_file_target(out: Path) -> bool:
    """``-o`` names a file when it has an image extension and is no existing folder; another extension is refused
    (``o.xyz`` would otherwise silently become a folder)."""
    if out.is_dir() or not out.suffix:
        return False
    if out.suffix.lower() not in EXT_FORMAT:
        raise UpscaleIOError(f"-o {out}: {out.suffix!r} is not an output image format ({', '.join(EXT_FORMAT)}); "
                             f"give an image file name or a folder name without an extension")
    return True


def is_done(path: Path) -> bool:
    """An output that ``--skip-existing`` skips: a non-empty file (an empty file is no finished output)."""
    return path.is_file() and path.stat().st_size > 0


def plan_outputs(inputs: Sequence[Path], output: str | Path, scale: int, fmt: str | None = None) -> list[Path]:
    """One output path per input (see the module docstring)."""
    out = Path(output)
    if _is_file_target(out):
        if len(inputs) != 1:
            raise UpscaleIOError(f"-o {out} names a file, but {len(inputs)} inputs were given: give a folder")
        want = EXT_FORMAT[out.suffix.lower()]
        if fmt is not None and output_format(inputs[0], fmt) != want:
            raise UpscaleIOError(f"-o {out} is a {want} file name but --format is {fmt}")
        if not can_write(want):
            raise UpscaleIOError(f"this Pillow cannot write {want}: use another extension")
        paths = [out]
    else:
        if out.exists() and not out.is_dir():
            raise UpscaleIOError(f"{out}: exists and is not a folder (give a folder or an image file name)")
        paths, used = [], set()
        for p in inputs:
            ext = FORMAT_EXT[output_format(p, fmt)]
            if p.suffix.lower() in (".jpeg", ".tiff") and EXT_FORMAT[p.suffix.lower()] == output_format(p, fmt):
                ext = p.suffix.lower()  # keep the input's spelling
            base, k = f"{p.stem}_x{scale}", 0
            q = out / f"{base}{ext}"
            while q in used:
                k += 1
                q = out / f"{base}-{k}{ext}"
            used.add(q)
            paths.append(q)
    for i, q in zip(inputs, paths):
        if q.exists() and q.resolve() == Path(i).resolve():
            raise UpscaleIOError(f"{q}: the output would overwrite its input")
    return paths


# ------------------------------------------------------------------------------------------------
# items: an image, or one sample of a latents file


@dataclass
class Item:
    path: Path                 # the input file
    size: tuple[int, int]      # low-res size in pixels (H, W); latents: 8 x the latent size
    name: Path                 # what the output is named after
    index: int | None = None   # latents file: the sample in it
    latent: tuple[int, int] | None = None  # latents file: the low-res latent size (h, w)

    @property
    def label(self) -> str:
        """The input as messages name it (a latents file's sample with its index)."""
        return str(self.path) + (f"[{self.index}]" if self.index is not None else "")


@lru_cache(maxsize=1)
def latents_file(read: Callable, path: Path):
    """``read(path)`` (an upscaler's ``read_latents``), once per file although every sample is a separate output."""
    return read(path)


def is_latents(path: Path) -> bool:
    return path.suffix.lower() in LATENT_EXTENSIONS


def latents_shape(path: Path) -> tuple[int, ...]:
    try:
        with safe_open(str(path), framework="pt") as f:
            if "latents" not in f.keys():
                fail(f"{path}: no 'latents' tensor (expected a file from scripts/txt2img.py --latents-out)")
            return tuple(f.get_slice("latents").get_shape())
    except Exception as e:  # noqa: BLE001 -- OSError, or safetensors' own SafetensorError for a bad header
        fail(f"{path}: not a readable latents file ({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def latent_items(path: Path, upscaler, readers: Sequence[str]) -> list[Item]:
    """One item per sample of a latents file; refused unless ``upscaler`` reads latents (``readers``: those that
    do)."""
    if upscaler.read_latents is None:
        fail(f"{path}: a latents file; only --model {' / '.join(readers)} (the latent upscaler) takes latents, the "
             f"{upscaler.name} upscaler takes images")
    shape = latents_shape(path)
    if len(shape) != 4 or shape[1] != 4:
        fail(f"{path}: latents of shape {shape}, {upscaler.title} needs SD 1.x / 2.x latents (B, 4, h, w)")
    items = []
    for i in range(shape[0]):
        name = path.with_suffix(".png") if shape[0] == 1 else path.with_name(f"{path.stem}-{i}.png")
        items.append(Item(path, (8 * shape[2], 8 * shape[3]), name, i, (shape[2], shape[3])))
    return items


def plan_items(inputs: list[Path], upscaler, readers: Sequence[str], max_pixels: int | None = None,
               decode: bool = False) -> list[Item]:
    """Pass over every input before any work: readable, and latents only for an upscaler that reads them. From the
    headers alone (the dry run), or with ``decode`` each image decoded once and dropped, so a corrupt one fails
    before the first output."""
    items = []
    for path in inputs:
        if is_latents(path):
            items.extend(latent_items(path, upscaler, readers))
            continue
        try:
            items.append(Item(path, image_size(path, max_pixels), path))
            if decode:
                read_image(path, max_pixels)
        except UpscaleIOError as e:
            fail(str(e))
    return items
