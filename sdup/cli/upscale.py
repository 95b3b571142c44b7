"""``python -m sdup upscale`` = ``scripts/upscale.py``: the command from its arguments to the written outputs
(the usage text: ``arguments.UPSCALE_DOC``).  Every check that needs no weights runs first: arguments, inputs,
outputs, the upscaler's options; then the weights are loaded once and the inputs run (``running``)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from .. import distributed
from ..fileio import Terminated, sigterm_as_interrupt
from ..pipelines.registry import UPSCALERS
from ..images import UpscaleIOError, first_line, note
from .arguments import DEFAULT_OUTPUT, build_parser, check_args, fail, parse_ids, say
from .inputs import expand_inputs, plan_items, plan_outputs
from .outputs import changed_input, check_outputs, is_done, owner
from .planning import check_size, dry_run, settings, upscaler_options, which_model
from .provenance import rerun_args
from .running import Command, load_model, run_all


def prompts(args):
    """(prompt, negative prompt): text, or token ids where given as ids."""
    prompt_ids = parse_ids(args.prompt_ids, "--prompt-ids")
    negative_ids = parse_ids(args.negative_prompt_ids, "--negative-prompt-ids")
    return (prompt_ids if prompt_ids is not None else args.prompt,
            negative_ids if negative_ids is not None else args.negative_prompt)


def todo_list(args, items, outputs) -> list:
    """The (item, output) pairs to run: all of them, less the done ones with --skip-existing (``outputs.is_done``);
    under torchrun the main rank's list on every rank (made before any rank writes)."""
    group = getattr(args, "group", None)
    main = group is None or group.is_main
    done = [args.skip_existing and is_done(o, it) for it, o in zip(items, outputs)]
    todo = [(it, o) for it, o, d in zip(items, outputs, done) if not d]
    if group is not None:
        todo = distributed.exchange(lambda: todo, group)[0]
    for it, o, d in zip(items, outputs, done):
        if d and main:
            say(f"skip {it.label} ({o} exists)")
        elif args.skip_existing and main and changed_input(o, it):
            note(f"{it.label} changed since {o} was made from it: upscaled again")
    return todo


@dataclass
class Planned:
    """An upscale command after every check that needs no weights (``plan_command``)."""
    upscaler: Any
    meta: Any                   # the model on the meta device (--dry-run), else None
    scale: float
    items: list
    outputs: list
    prompt: Any                 # text or token ids
    negative: Any
    notes: list                 # printed once the run is sure to start (inputs left out, ...)


def plan_command(args) -> Planned:
    """Arguments, inputs, outputs and the upscaler's options, checked before touching the weights (``fail`` on the
    first mistake); the web page (``sdup.web``) runs the same."""
    check_args(args)
    prompt, negative = prompts(args)
    notes: list[str] = []  # printed once the run is sure to start
    try:
        inputs = expand_inputs(args.inputs, notes)
    except UpscaleIOError as e:
        fail(str(e))
    upscaler, meta = which_model(args)
    scale = upscaler_options(args, upscaler)
    settings(args, upscaler, meta)  # before loading gigabytes
    readers = [u.name for u in UPSCALERS.values() if u.read_latents is not None]
    # header pass: every input readable (and of the right kind) before any work
    items = plan_items(inputs, upscaler, readers, args.max_pixels, decode=not args.dry_run)
    try:
        outputs = plan_outputs([it.name for it in items], args.output or DEFAULT_OUTPUT, f"{scale:g}", args.format,
                               owner(items))
    except UpscaleIOError as e:
        fail(str(e))
    return Planned(upscaler, meta, scale, items, outputs, prompt, negative, notes)


def cmd_upscale(args) -> int:
    planned = plan_command(args)
    upscaler, scale = planned.upscaler, planned.scale
    if args.dry_run:
        code = dry_run(args, upscaler, planned.meta, scale, planned.items, planned.outputs)
        for line in planned.notes:
            note(line)
        return code
    todo = todo_list(args, planned.items, planned.outputs)
    if not todo:
        print("nothing to do: every output exists (--skip-existing)")
        return 0
    check_outputs([out for _, out in todo], args.overwrite)  # now, not after the sampling
    for line in planned.notes:
        note(line)
    model = load_model(args, upscaler)
    for it, _ in todo:
        check_size(it, upscaler, model)
    run_all(args, Command(upscaler, model, scale, settings(args, upscaler, model), planned.prompt, planned.negative,
                          todo))
    return 0


def upscale_main(argv=None, prog: str | None = None) -> int:
    """The command (``scripts/upscale.py``): every way it can end that is not an output is one line and exit code 2
    (``fail``): mistakes, Ctrl-C / SIGTERM at any point, and a name the system refuses (too long, no permission)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    group = None
    try:
        with sigterm_as_interrupt():
            args = _arguments(parser, args, argv)
            args.group = group = distributed.from_environment()  # None unless torchrun started several processes
            return cmd_upscale(args)
    except KeyboardInterrupt as e:  # while loading or planning (the loop has its own)
        fail(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'} (no partial output written)")
    except OSError as e:  # not a mistake any check names: a path the system refuses
        fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else first_line(e))
    finally:
        distributed.close(group)


def _arguments(parser, args, argv):
    if args.rerun:
        return rerun_args(parser, args)
    if not args.inputs:
        parser.error("the following arguments are required: INPUT (or --rerun OUTPUT)")
    args.argv = argv
    return args
