"""The run: the weights loaded once (with the upscaler's extra components), then per input read -> plan ->
prepare -> sample -> finish -> write.  Under torchrun the inputs are dealt out to the ranks in rounds, or, for a
single input, its tiles are (``sdup.distributed``)."""
from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..checkpoints import CheckpointError, KeyMismatch, load
from ..checkpoints.loader import BUILD_ERRORS
from ..distributed import RankFailed, exchange
from ..fileio import Terminated, claim, claim_holder, fingerprint, make_folders, remove_abandoned, remove_empty
from ..optimize import compile_model, prepare
from .. import images
from ..pipelines.result import DTYPES
from ..pipelines.job import NonFiniteResult, run
from ..pipelines.resume import Checkpoint, state_path
from ..pipelines.upscaler import Upscaler
from .arguments import fail, say
from .inputs import Item, latents_file
from .outputs import is_done
from .planning import tile_plan
from .provenance import recorded_parameters


@dataclass
class Command:
    """One upscale command after planning: what every input shares, and the (input, output) pairs to do."""
    upscaler: Upscaler
    model: Any                  # the LoadedModel
    scale: float
    settings: dict              # the upscaler's options (``planning.settings``)
    prompt: Any                 # text or token ids
    negative: Any
    todo: list = field(default_factory=list)
    on_step: Any = None         # called after every sampler step (``Job.callback``): progress, cancel (``sdup.web``)


# ------------------------------------------------------------------------------------------------
# loading


def _device(name: str | None) -> str:
    """A device that computes: a small sum there comes back to the CPU (``meta`` holds no data, other names have no
    backend in this torch build); anything else is one line."""
    device = name if name is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok = float((torch.ones(2, device=device) + 1).sum().cpu()) == 4.0
    except Exception as e:  # noqa: BLE001 -- RuntimeError, NotImplementedError, ModuleNotFoundError, AssertionError
        fail(f"--device {device}: not available ({images.first_line(e)[:200]})")
    if not ok:
        fail(f"--device {device}: computes wrong results")
    return device


def _load(path: str, config: str | None, device: str, dtype):
    try:
        return load(path, config=config, device=device, dtype=dtype)
    except KeyMismatch as e:
        fail(e.one_line())
    except CheckpointError as e:  # one line of ours, whole
        fail(str(e))
    except (ValueError, OSError) as e:
        fail(images.first_line(e))
    except BUILD_ERRORS as e:  # a --config whose values build no model; or no memory for the one it describes
        fail(f"{path}: cannot build the model{' of --config ' + str(config) if config else ''} ({images.first_line(e)})")


def load_model(args, upscaler):
    """The weights plus the upscaler's extra components (``--vae``), checked complete, with fused q/k/v and, with
    --compile, a compiled UNet."""
    group = getattr(args, "group", None)
    device = _device(args.device if args.device is not None else
                     group.device if group is not None and group.device != "cpu" else None)
    model = _load(args.weights, args.config, device, DTYPES[args.dtype])
    if upscaler.attach is not None:
        try:
            upscaler.attach(model, args, lambda path: _load(path, None, device, torch.float32))
        except ValueError as e:
            fail(str(e))
    lacking = [c for c in ("unet", "vae", "text_encoder") if getattr(model, c) is None]
    if lacking:
        fail(f"{args.weights}: the checkpoint has no {' / '.join(lacking)} (an incomplete diffusers folder?); the "
             f"{upscaler.name} upscaler needs UNet, VAE and text encoder")
    # fused q/k/v, bf16 oneDNN Linears, the memory format (the state dict is unchanged); recorded in the outputs
    args.memory_format_used = prepare(model, args.memory_format)
    if args.compile:
        compile_model(model, vae_decoder=False)  # UNet forward, dynamic shapes (tiles / sizes do not recompile)
    return model


# ------------------------------------------------------------------------------------------------
# the loop


def run_all(args, command: Command) -> None:
    """The loop over ``command.todo``: a user-facing failure ends in one line. Under torchrun (``args.group``) the inputs
    are dealt out to the ranks in rounds, or, for a single input, its tiles are."""
    group, todo = getattr(args, "group", None), command.todo
    main = group is None or group.is_main
    world = 1 if group is None or len(todo) == 1 else group.world_size
    bar = tqdm(total=len(todo), desc="images", unit="img", disable=args.quiet or not main or len(todo) < 2,
               file=sys.stderr)
    path = None
    try:
        for first in range(0, len(todo), world):
            k = first + (group.rank if world > 1 else 0)
            path = todo[k][0].path if k < len(todo) else None
            writer = main or world > 1  # one input over all ranks (its tiles split): the main rank writes it
            split = group if world == 1 else None  # a folder: each rank runs its own input alone
            work = partial(run_claimed, args, command, *todo[k], writer, split) if k < len(todo) else (lambda: None)
            for line in (exchange(work, group) if group is not None else [work()]):
                if line and main:
                    say(line)
            bar.update(min(world, len(todo) - first))
    except RankFailed as e:
        fail(str(e))
    except images.UpscaleIOError as e:  # one line of ours, whole (a name in it may hold a newline: escaped)
        fail(str(e))
    except (ValueError, OSError) as e:
        fail(images.first_line(e))
    except RuntimeError as e:  # torch.OutOfMemoryError and friends; anything else is a bug: keep the traceback
        if "out of memory" not in str(e).lower() and "can't allocate memory" not in str(e).lower():
            raise
        fail(f"out of memory upscaling {path} ({str(e).splitlines()[0][:120]}); try a smaller --tile / --vae-tile "
             "(see --dry-run for the estimate) or --dtype fp16")
    except KeyboardInterrupt as e:
        fail(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'} (no partial output written)")


def run_claimed(args, command: Command, it: Item, out: Path, writer: bool, split=None) -> str | None:
    """``run_one`` under the output's claim (``sdup.fileio.claim``), so that concurrent runs over one folder share
    the work: an output another process is making is left to it, and one that became done meanwhile is skipped
    (--skip-existing). The output's folders are made now, and removed again if the run fails before writing to
    them. A tile-parallel torchrun input (``split``) is not claimed: its ranks must agree."""
    if not writer or split is not None:
        return run_one(args, command, it, out, writer, split)
    made = make_folders(out.parent)
    try:
        with claim(out) as ours:
            if not ours:
                return f"skip {it.label} ({claim_holder(out)} is making {out})"
            if args.skip_existing and is_done(out, it):
                return f"skip {it.label} ({out} exists)"
            return run_one(args, command, it, out, writer, split)
    except BaseException:
        remove_empty(made)
        raise


def run_one(args, command: Command, it: Item, out: Path, writer: bool, split=None) -> str | None:
    """Read, plan, upscale and (``writer``) write one input; returns the line to print."""
    upscaler, model = command.upscaler, command.model
    img, size = None, it.size
    if it.index is None:
        img = images.read_image(it.path, args.max_pixels)
        for n in img.notes:
            images.note(n)
        lo = max(8, upscaler.min_side(model))
        if min(img.size) < lo:
            raise images.UpscaleIOError(f"{it.path}: {img.size[1]}x{img.size[0]} is smaller than the {upscaler.name} "
                                        f"model's minimum {lo}x{lo}")
        size = img.size
    plan = tile_plan(args, upscaler, model, it, size, command.scale, command.settings)
    t0 = time.time()
    checkpoint = resume_checkpoint(args, it, out, writer, split)
    try:
        result = run_item(args, command, it, img, plan, progress=not args.quiet and writer, split=split,
                          checkpoint=checkpoint)
    except NonFiniteResult as e:
        raise images.UpscaleIOError(f"{it.label}: {e}") from None
    if not writer:  # tile-parallel: every rank computed the same image, the main rank writes it
        return None
    source = latents_file(upscaler.read_latents, it.path)[1].get("parameters") if img is None else None
    params = recorded_parameters(args, it, out, img, result, command.scale, time.time() - t0, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    images.write_image(out, result.images[0], img.alpha if img is not None else None,
                       bits=img.bits if img is not None else 8, parameters=params,
                       icc_profile=img.icc_profile if img is not None else None)
    checkpoint.remove()  # the output is in place: its resume state is done with
    remove_abandoned(out)  # and the temporary file of a write killed in an earlier run
    return f"wrote {out}"


def resume_checkpoint(args, it: Item, out: Path, writer: bool, split=None) -> Checkpoint:
    """The resume state of ``out`` (``sdup.pipelines.resume``): saved every ``--checkpoint-every`` steps (default:
    about once a minute), used on the next run unless ``--no-resume`` or something it depends on changed: the
    weights, config, --vae and input files (sha256), and the job itself (seed, parameters, tiles, ...)."""
    files = {"weights": args.weights, "config": args.config, "vae": args.vae, "input": it.path}
    depends = {name: fingerprint(path) for name, path in files.items() if path}
    depends.update({"input index": it.index, "memory format": getattr(args, "memory_format_used", None),
                    "compile": args.compile})
    return Checkpoint(state_path(out), depends, every=args.checkpoint_every, resume=not args.no_resume,
                      writer=writer, group=split, label=it.label, note=images.note)


def run_item(args, command: Command, item: Item, img, plan, progress: bool, split=None, checkpoint=None):
    """prepare -> sample -> finish of one input on ``plan``, under ``torch.inference_mode()``; ``split``: the group
    its tiles are split over (torchrun with a single input), or None; ``checkpoint``: the resume state."""
    latents = None
    if img is None:
        latents = latents_file(command.upscaler.read_latents, item.path)[0][item.index:item.index + 1]
    with torch.inference_mode():
        job = command.upscaler.job(command.model, image=img.rgb[None] if img is not None else None, latents=latents,
                                   plan=plan, prompt=command.prompt, negative_prompt=command.negative, seed=args.seed,
                                   color_fix_mode=args.color_fix, vae_dtype=DTYPES[args.vae_dtype],
                                   progress=progress, **command.settings)
        if command.on_step is not None:
            job.callback = command.on_step
        # torchrun with one input: each step's tiles and the VAE tiles split over the ranks
        return run(job, split, checkpoint)
