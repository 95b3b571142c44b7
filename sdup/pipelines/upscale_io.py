"""Which files the upscaler CLI reads and writes (model-independent); reading and writing images is ``sdup.images``.

    inputs = expand_inputs(["photos/", "scans/*.tif", "one.png"])     # files, folders (non-recursive), globs
    outputs = plan_outputs(inputs, "out/", scale=4, fmt=None)          # out/<stem>_x4.<ext>

Inputs
    A folder contributes its image files (extensions ``IMAGE_EXTENSIONS``, case-insensitive, sorted, not
    recursive); a glob (``*``, ``?``, ``[``) its matching image files; a file name is taken as is (a non-image
    fails when read). Duplicates are dropped. Nothing at all -> ``UpscaleIOError``.
Outputs
    ``-o NAME.ext`` (an image extension, not an existing folder) is a file, allowed for one input only;
    anything else is a folder (created on write) holding ``<stem>_x<scale>.<ext>``. ``ext``: ``--format``
    (png | jpg | webp | tiff) or the input's own extension; inputs Pillow cannot write here (BMP, or WebP when
    Pillow lacks WebP) become PNG. Two inputs mapping to one name get ``-1``, ``-2`` suffixes. An existing
    output is replaced (atomically) unless ``--skip-existing``, which skips an input whose output name exists.
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Sequence

from ..images import EXT_FORMAT, FORMAT_EXT, IMAGE_EXTENSIONS, UpscaleIOError, can_write, output_format

_GLOB_CHARS = set("*?[")


# ------------------------------------------------------------------------------------------------
# inputs


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


# ------------------------------------------------------------------------------------------------
# outputs


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
# dry run


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def dry_run_report(rows: Sequence[dict]) -> str:
    """Text for ``--dry-run``: one line per image from dicts with keys input, output, in_size (H, W),
    out_size (H, W), latent_tiles, vae_tiles, peak_bytes, and optionally skip (reason) / error."""
    lines = []
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['input']}: error: {r['error']}")
            continue
        ih, iw = r["in_size"]
        oh, ow = r["out_size"]
        s = f"{r['input']} ({iw}x{ih}) -> {r['output']} ({ow}x{oh})"
        if r.get("skip"):
            lines.append(f"{s}: skipped ({r['skip']})")
            continue
        lines.append(f"{s}: latent tiles {r['latent_tiles']}, VAE tiles {r['vae_tiles']}, "
                     f"estimated peak memory ~{format_bytes(r['peak_bytes'])}")
    return "\n".join(lines)


__all__ = ["expand_inputs", "plan_outputs", "is_done", "dry_run_report", "format_bytes"]
