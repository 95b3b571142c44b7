"""Files already at the output names: which are sdup's outputs, which of those are done, which may be replaced.

* ``sdup_parameters(path)``: the parameters of an image sdup wrote (a JSON object with ``sdup_version``), else
  None; from the file's header alone, so that recognising the outputs in an input folder decodes nothing.
* ``made_from(params, item)``: whether an output records this input: its full path (and a latents file's sample)
  and, with ``content``, the sha256 of the file as it is now.
* ``is_done(out, item)``: what ``--skip-existing`` skips: an output sdup made from this very input, unchanged since.
  An output of another input that maps to the same name (``a.png`` done, ``a.jpg`` added with --format png) is
  not done, nor is one whose input changed.
* ``replaceable(out)``: what a run replaces without ``--overwrite``: nothing there, an empty file, or an output sdup
  wrote under this very name (it records its name). Anything else (a file of the user's, an output renamed or
  copied there) is kept and the run refused before any work (``check_outputs``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from ..fileio import can_create, fingerprint
from ..images import UpscaleIOError, read_parameters
from .arguments import fail

SDUP_KEY = "sdup_version"  # every parameters record sdup writes has it (``pipelines.job.base_parameters``)


def sdup_parameters(path: Path) -> dict | None:
    """The parameters of an image sdup wrote, None for any other file (unreadable ones included)."""
    try:
        params = read_parameters(path, header_only=True)
    except (UpscaleIOError, OSError):
        return None
    return params if params is not None and SDUP_KEY in params else None


def input_record(item) -> dict:
    """What an output records about its input (``made_from`` reads it back)."""
    return dict(input_path=str(item.path.resolve()), input_sha256=fingerprint(item.path))


def made_from(params: dict, item, content: bool = True) -> bool:
    if params.get("input_path") != str(item.path.resolve()) or params.get("input_index") != item.index:
        return False
    return not content or params.get("input_sha256") == fingerprint(item.path)


def _existing_params(out: Path) -> dict | None:
    return sdup_parameters(out) if out.is_file() and out.stat().st_size > 0 else None


def is_done(out: Path, item) -> bool:
    params = _existing_params(out)
    return params is not None and made_from(params, item)


def changed_input(out: Path, item) -> bool:
    """An output made from this input's path whose content has changed since (``--skip-existing`` redoes it)."""
    params = _existing_params(out)
    return params is not None and made_from(params, item, content=False) and not made_from(params, item)


def replaceable(out: Path) -> bool:
    if not out.exists() and not out.is_symlink():
        return True
    if out.is_file() and out.stat().st_size == 0:
        return True
    params = _existing_params(out)
    return params is not None and params.get("output", out.name) == out.name


def owner(items: Sequence) -> Callable:
    """For ``inputs.plan_outputs``: which of the inputs ``candidates`` (indices into ``items``) made the existing
    output ``q``, so that it keeps its name when another input with the same stem joins the folder."""
    def made(q: Path, candidates: Sequence[int]) -> int | None:
        params = _existing_params(q)
        return next((i for i in candidates if params is not None and made_from(params, items[i], content=False)),
                    None)
    return made


def check_outputs(outputs: Sequence[Path], overwrite: bool) -> None:
    """Before any work: every output can be written (nothing is created: folders come with the first write), and
    none would replace a file that is not an output sdup wrote under that name, unless ``overwrite``."""
    for out in outputs:
        try:
            can_create(out)
        except OSError as e:
            fail(f"{out}: cannot write the output there ({e.strerror or e})")
    kept = [out for out in outputs if not replaceable(out)] if not overwrite else []
    if kept:
        more = f" (and {len(kept) - 1} more)" if len(kept) > 1 else ""
        fail(f"{kept[0]}: exists and is not an output sdup wrote under this name{more}; it is kept: pass --overwrite "
             f"to replace it, or choose another -o")
