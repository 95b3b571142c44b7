"""The page's options, taken from the command line's own parser and the upscaler's record, and the way back: the
form's values -> the upscale command's arguments (``argv``), so the page runs exactly what the CLI runs.

* ``fields(upscaler)``: the options this upscaler takes (``Field``: flag, label, help, choices, kind) -- the common
  ones, those its ``Defaults`` name (``noise_level``, ``schedule``) and its ``own_options`` (StableSR's ``dec_w`` ...).
* ``form_argv(fields, values)``: a value left empty (or "default") is left out: the upscaler's default applies.
* ``stage_uploads(files, folder, ...)``: uploads copied to ``image-<k><ext>`` in a folder of the server's: an upload's
  name is shown on the page, never used as a path (the extension only when it is in the allowed list).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..cli.arguments import build_parser
from ..cli.inputs import LATENT_EXTENSIONS
from ..images import IMAGE_EXTENSIONS, UpscaleIOError

COMMON = ("steps", "sampler", "guidance", "seed", "tile", "tile_overlap", "vae_tile", "color_fix", "dtype")
MODEL_OPTIONS = ("noise_level", "schedule", "dec_w", "scale", "input_size", "start")
DEFAULT = "default"  # a choice left to the upscaler
PROMPT_KINDS = ("text", "token ids")


@dataclass(frozen=True)
class Field:
    dest: str                   # the argparse dest ("noise_level")
    flag: str                   # "--noise-level"
    help: str
    choices: tuple | None       # a dropdown; None: a number
    kind: str                   # "int" | "float" | "choice"
    default: object             # what the parser fills in when the option is not given (None: the upscaler's)

    @property
    def label(self) -> str:
        return self.dest.replace("_", " ")


def _actions() -> dict:
    return {a.dest: a for a in build_parser()._actions}


def takes(upscaler, dest: str) -> bool:
    """Whether the upscaler takes the option: a common one, one its ``Defaults`` names, or one of its own."""
    return dest in COMMON or dest in upscaler.own_options or hasattr(upscaler.defaults, dest)


def fields(upscaler) -> list[Field]:
    """The form's fields for ``upscaler``, in the order of ``COMMON`` then ``MODEL_OPTIONS``."""
    actions = _actions()
    out = []
    for dest in (*COMMON, *MODEL_OPTIONS):
        if not takes(upscaler, dest):
            continue
        a = actions[dest]
        kind = "choice" if a.choices else "int" if a.type is int else "float"
        out.append(Field(dest, a.option_strings[-1], (a.help or "").replace("%%", "%"),
                         tuple(a.choices) if a.choices else None, kind, a.default))
    return out


def shown_default(upscaler, f: Field) -> str:
    """What an empty field means: the upscaler's default (its ``Defaults``), else the parser's, else "auto"."""
    value = getattr(upscaler.defaults, f.dest, None)
    value = f.default if value is None else value
    return "auto" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def form_argv(fs: list[Field], values: list, prompt: tuple[str, str], negative: tuple[str, str]) -> list[str]:
    """The command-line arguments of the form: ``values`` in the order of ``fs`` (numbers as typed: the parser
    checks them); ``prompt`` / ``negative``: (text, one of ``PROMPT_KINDS``)."""
    argv = []
    for (text, kind), flag in ((prompt, "--prompt"), (negative, "--negative-prompt")):
        if text and text.strip():
            argv += [flag + ("-ids" if kind == PROMPT_KINDS[1] else ""), text.strip()]
    for f, v in zip(fs, values):
        v = "" if v is None else str(v).strip()
        if v in ("", DEFAULT) or (f.kind == "choice" and v == f.default):
            continue
        argv += [f.flag, v]
    return argv


def allowed_extensions(upscaler) -> tuple[str, ...]:
    """What the page accepts: image files, and latents files for an upscaler that reads them."""
    return IMAGE_EXTENSIONS + (LATENT_EXTENSIONS if upscaler.read_latents is not None else ())


@dataclass(frozen=True)
class Upload:
    name: str                   # the name the browser gave (shown, never a path)
    path: Path                  # where the server keeps it: <folder>/image-<k><ext>


def stage_uploads(files: list[str], folder: Path, allowed: tuple[str, ...], max_bytes: int) -> list[Upload]:
    """Copy the uploaded files (paths the web framework saved them at) into ``folder`` under names of the server's;
    an unsupported extension or an oversized file is an ``UpscaleIOError`` naming the upload."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, src in enumerate(files, 1):
        name = Path(src).name
        ext = Path(name).suffix.lower()
        if ext not in allowed:
            raise UpscaleIOError(f"{name}: not a supported file (upload {', '.join(e[1:] for e in allowed)})")
        size = Path(src).stat().st_size
        if max_bytes and size > max_bytes:
            raise UpscaleIOError(f"{name}: {size / 2**20:.1f} MiB is above the upload limit of "
                                 f"{max_bytes / 2**20:g} MiB")
        dst = folder / f"image-{k}{ext}"
        shutil.copyfile(src, dst)
        out.append(Upload(name, dst))
    return out


def present(message: str, names: dict) -> str:
    """A message with the server's paths replaced by what the page calls them (``names``: path -> name)."""
    for path, name in names.items():
        message = message.replace(str(path), name)
    return message
