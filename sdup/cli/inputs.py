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
    Pillow lacks WebP) become PNG. Two inputs mapping to one name get ``-1``, ``-2`` suffixes (an existing output
    keeps its name for the input it records). What may be replaced and what ``--skip-existing`` skips:
    ``outputs``. The outputs sdup wrote (they carry its parameters) are left out of folders and globs.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

from safetensors import safe_open

from ..images import (EXT_FORMAT, FORMAT_EXT, IMAGE_EXTENSIONS, UpscaleIOError, can_write, image_size, note,
                      output_format, read_image)
from .arguments import fail
from .outputs import sdup_parameters

_GLOB_CHARS = set("*?[")
LATENT_EXTENSIONS = (".safetensors",)  # latents files of scripts/txt2img.py --latents-out


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def expand_inputs(specs: Sequence[str | Path], notes: list[str] | None = None) -> list[Path]:
    """Files, folders (their image files, not recursive) and globs -> image paths, in order, without duplicates;
    ``notes``: where the lines about left-out outputs of sdup go (None: printed now)."""
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
            found = _not_outputs(found, p, notes)
        elif p.is_file():
            found = [p]
        elif _GLOB_CHARS & set(s):
            found = [Path(q) for q in sorted(glob.glob(s)) if Path(q).is_file() and _is_image_name(Path(q))]
            if not found:
                raise UpscaleIOError(f"{s}: nothing matches (no image files)")
            found = _not_outputs(found, s, notes)
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



def _not_outputs(found: list[Path], spec, notes: list[str] | None) -> list[Path]:
    """The files of a folder or glob less the outputs sdup wrote (a run whose output folder is its input folder
    would otherwise upscale its own outputs next time: ``a_x4_x4.png``), with a note; named files are taken as is."""
    ours = [q for q in found if sdup_parameters(q) is not None]
    if not ours:
        return found
    names = ", ".join(q.name for q in ours[:3]) + (", ..." if len(ours) > 3 else "")
    if len(ours) == len(found):
        raise UpscaleIOError(f"{spec}: no inputs: its {len(ours)} image file(s) are outputs of sdup ({names}); name "
                             f"a file to upscale it again")
    line = f"{spec}: {len(ours)} output(s) of sdup left out ({names}); name a file to upscale it again"
    note(line) if notes is None else notes.append(line)
    return [q for q in found if q not in ours]


def _is_file_target(out: Path) -> bool:
    """``-o`` names a file when it has an image extension and is no existing folder; another extension is refused
    (``o.xyz`` would otherwise silently become a folder)."""
    if out.is_dir() or not out.suffix:
        return False
    if out.suffix.lower() not in EXT_FORMAT:
        raise UpscaleIOError(f"-o {out}: {out.suffix!r} is not an output image format ({', '.join(EXT_FORMAT)}); "
                             f"give an image file name or a folder name without an extension")
    return True


def _output_ext(p: Path, fmt: str | None) -> str:
    ext = FORMAT_EXT[output_format(p, fmt)]
    if p.suffix.lower() in (".jpeg", ".tiff") and EXT_FORMAT[p.suffix.lower()] == output_format(p, fmt):
        ext = p.suffix.lower()  # keep the input's spelling
    return ext


def _folder_outputs(inputs: Sequence[Path], out: Path, scale, fmt: str | None, owner: Callable | None) -> list[Path]:
    """``out/<stem>_x<scale><ext>``; inputs with one name get ``-1``, ``-2``, ..., an existing output keeping its
    name for the input that made it (``owner(path, candidates)``: the index of that input, or None)."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, p in enumerate(inputs):
        groups.setdefault((f"{p.stem}_x{scale}", _output_ext(p, fmt)), []).append(i)
    paths: list[Path] = [out] * len(inputs)
    for (base, ext), members in groups.items():
        names = [out / f"{base}{ext}"] + [out / f"{base}-{k}{ext}" for k in range(1, len(members))]
        owned: dict[Path, int] = {}
        for q in names if len(members) > 1 and owner is not None else ():
            i = owner(q, [m for m in members if m not in owned.values()])
            if i is not None:
                owned[q] = i
        rest = [m for m in members if m not in owned.values()]
        for q in names:
            paths[owned[q] if q in owned else rest.pop(0)] = q
    return paths


def plan_outputs(inputs: Sequence[Path], output: str | Path, scale: int, fmt: str | None = None,
                 owner: Callable | None = None) -> list[Path]:
    """One output path per input (see the module docstring; ``owner``: ``_folder_outputs``)."""
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
        paths = _folder_outputs(inputs, out, scale, fmt, owner)
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
