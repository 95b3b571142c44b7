"""What an output records about how it was made (its parameters), and ``--rerun``, which runs that again: the
command as given, the folder it ran in, the input's full path, and the weights' and config's sha256."""
from __future__ import annotations

import os
from pathlib import Path

from ..fileio import fingerprint
from .. import images
from .arguments import fail
from .inputs import Item
from .outputs import input_record

PATH_OPTIONS = ("weights", "config", "vae")  # file options a recorded command names, resolved against its folder


def recorded_parameters(args, it: Item, out: Path, img, result, scale, seconds: float,
                        latents_source: dict | None = None) -> dict:
    """The parameters an output stores: what was run (the pipeline's, with the ``tiling`` of its plan), the input
    (``latents_source``: the generation parameters a latents file holds), its own name (``outputs.replaceable``),
    the time, and what ``--rerun`` needs."""
    params = result.sample_parameters(0)
    params.pop("batch_index", None)
    params.update(input=it.path.name, output=out.name, seed=args.seed, scale=scale, tiling=params.get("tiling", "off"),
                  seconds=round(seconds, 2), memory_format=getattr(args, "memory_format_used", None))
    if img is not None:
        params.update(input_bits=img.bits, alpha="upscaled separately (bicubic)" if img.alpha is not None else None)
    else:
        params.update(input_index=it.index, latents_source=latents_source)
    if args.vae:
        params["vae"] = str(args.vae)
    params.update(reproduction(args, it))
    return {k: v for k, v in params.items() if v is not None}


def reproduction(args, it: Item) -> dict:
    """What ``--rerun`` needs: the command as given, the folder it ran in, the input's full path and sha256
    (``outputs.input_record``), and the weights' and config's sha256."""
    return dict(command=getattr(args, "argv", None), cwd=getattr(args, "cwd", None) or os.getcwd(),
                **input_record(it),
                weights_sha256=fingerprint(args.weights), config=str(Path(args.config).resolve()) if args.config else None,
                config_sha256=fingerprint(args.config) if args.config else None)


RECORD = {"command": list, "cwd": str, "input_path": str}       # what --rerun needs, and its type
CHECKED = ("weights_sha256", "config_sha256", "input_sha256")   # strings when present
MAX_WORDS, MAX_CHARS = 1000, 1 << 16                            # a command line is not longer


def _check_record(made: Path, params: dict) -> None:
    """The reproduction record of ``made``, read back from a file anyone may have edited: the types, sizes and
    strings ``rerun_args`` relies on, or one line naming what is wrong."""
    def bad(why):
        fail(f"--rerun {made}: its recorded run is not usable ({why})")
    for key, kind in RECORD.items():
        if not isinstance(params.get(key), kind):
            bad(f"{key!r} is missing or not a {kind.__name__}")
    for key in CHECKED:
        if params.get(key) is not None and not isinstance(params[key], str):
            bad(f"{key!r} is not a string")
    command = params["command"]
    if not 0 < len(command) <= MAX_WORDS or not all(isinstance(a, str) and len(a) <= MAX_CHARS for a in command):
        bad("'command' must be a list of at most 1000 strings")
    if any("\0" in v for v in (*command, params["cwd"], params["input_path"])):
        bad("a NUL character in a recorded name")
    if not (Path(params["cwd"]).is_absolute() and Path(params["input_path"]).is_absolute()):
        bad("'cwd' and 'input_path' must be absolute paths")


def _recorded_command(made: Path, command: list):
    """The recorded command parsed as the upscale command's arguments (no --help, no --rerun of its own)."""
    from .arguments import Parser, add_upscale_arguments

    def refuse(message):
        fail(f"--rerun {made}: its recorded command is not valid ({message})")
    parser = add_upscale_arguments(Parser(prog="upscale", add_help=False))
    parser.error = refuse
    old = parser.parse_args(command)
    if old.rerun is not None:
        refuse("it is itself a --rerun")
    return old


def _check_input(made: Path, params: dict) -> None:
    """The input must be the file that made the output: the same sha256 (an older output records none: a note)."""
    path = Path(params["input_path"])
    if not path.is_file():
        fail(f"--rerun {made}: its input {path} is no longer there")
    if params.get("input_sha256") is None:
        images.note(f"{made} records no sha256 of its input (an older sdup): {path} is not checked")
    elif fingerprint(path) != params["input_sha256"]:
        fail(f"--rerun {made}: its input {path} changed since the run (its sha256 differs)")


def rerun_args(parser, args):
    """The arguments that made ``args.rerun``, on its recorded input, writing to ``-o``; the weights, config and
    input must be the same files (their sha256)."""
    made = Path(args.rerun)
    if args.inputs:
        fail("--rerun takes no inputs: it runs the input recorded in the output")
    try:
        params = images.read_parameters(made) if made.is_file() else None
    except (OSError, ValueError) as e:
        fail(f"--rerun {made}: not readable ({e if isinstance(e, images.UpscaleIOError) else images.first_line(e)})")
    if not params or "command" not in params:
        fail(f"--rerun {made}: no recorded command (not written by this version of sdup's upscaler)")
    _check_record(made, params)
    old = _recorded_command(made, params["command"])
    for name in PATH_OPTIONS:
        value = getattr(old, name)
        if value and not Path(value).is_absolute():
            setattr(old, name, str(Path(params["cwd"]) / value))
    if old.weights and Path(old.weights).exists() and fingerprint(old.weights) != params.get("weights_sha256"):
        fail(f"--rerun {made}: {old.weights} is not the file that made it (its sha256 differs)")
    if params.get("config_sha256") and old.config and fingerprint(old.config) != params["config_sha256"]:
        fail(f"--rerun {made}: {old.config} changed since the run (its sha256 differs)")
    _check_input(made, params)
    old.inputs, old.output, old.rerun = [params["input_path"]], args.output, None
    old.argv, old.cwd = params["command"], params["cwd"]  # recorded again as they were
    old.skip_existing, old.dry_run, old.quiet = False, args.dry_run, args.quiet
    old.overwrite = args.overwrite
    return old
