"""What an output records about how it was made (its parameters), and ``--rerun``, which runs that again: the
command as given, the folder it ran in, the input's full path, and the weights' and config's sha256."""
from __future__ import annotations

import os
from pathlib import Path

from ..fileio import fingerprint
from .. import images
from .arguments import fail
from .inputs import Item

PATH_OPTIONS = ("weights", "config", "vae")  # file options a recorded command names, resolved against its folder


def recorded_parameters(args, it: Item, img, result, scale, seconds: float, latents_source: dict | None = None) -> dict:
    """The parameters an output stores: what was run (the pipeline's, with the ``tiling`` of its plan), the input
    (``latents_source``: the generation parameters a latents file holds), the time, and what ``--rerun`` needs."""
    params = result.sample_parameters(0)
    params.pop("batch_index", None)
    params.update(input=it.path.name, seed=args.seed, scale=scale, tiling=params.get("tiling", "off"),
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
    """What ``--rerun`` needs: the command as given, the folder it ran in, the input's full path, and the weights' and
    config's sha256."""
    return dict(command=getattr(args, "argv", None), cwd=getattr(args, "cwd", None) or os.getcwd(),
                input_path=str(it.path.resolve()),
                weights_sha256=fingerprint(args.weights), config=str(Path(args.config).resolve()) if args.config else None,
                config_sha256=fingerprint(args.config) if args.config else None)


def rerun_args(parser, args):
    """The arguments that made ``args.rerun``, on its recorded input, writing to ``-o``; the weights must be the same."""
    made = Path(args.rerun)
    if args.inputs:
        fail("--rerun takes no inputs: it runs the input recorded in the output")
    try:
        params = images.read_parameters(made) if made.is_file() else None
    except (OSError, ValueError) as e:
        fail(f"--rerun {made}: not readable ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if not params or "command" not in params:
        fail(f"--rerun {made}: no recorded command (not written by this version of sdup's upscaler)")
    old = parser.parse_args(params["command"])
    for name in PATH_OPTIONS:
        value = getattr(old, name)
        if value and not Path(value).is_absolute():
            setattr(old, name, str(Path(params["cwd"]) / value))
    if old.weights and Path(old.weights).exists() and fingerprint(old.weights) != params.get("weights_sha256"):
        fail(f"--rerun {made}: {old.weights} is not the file that made it (its sha256 differs)")
    if params.get("config_sha256") and old.config and fingerprint(old.config) != params["config_sha256"]:
        fail(f"--rerun {made}: {old.config} changed since the run (its sha256 differs)")
    old.inputs, old.output, old.rerun = [params["input_path"]], args.output, None
    old.argv, old.cwd = params["command"], params["cwd"]  # recorded again as they were
    old.skip_existing, old.dry_run, old.quiet = False, args.dry_run, args.quiet
    return old
