"""Output file names for generated images (txt2img): a file, numbered files, or a folder of named files."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


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
