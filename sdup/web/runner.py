"""The page's work on the command line's own path: the form becomes the upscale command's arguments, parsed by its
parser and checked by ``plan_command`` (the upscaler's ``check_options`` included); the plan is the dry run's
report; a run is ``run_all`` on each input with the weights loaded once (per dtype) and written by the CLI's writer,
so a downloaded PNG holds the pixels the CLI writes for the same settings.

    runner = Runner(ServerOptions(weights="x4.ckpt"))
    runner.plan(uploads, form_args)           # the dry run's lines, the page's names for the paths
    runner.run(ticket)                        # [Output], progress and cancel through ticket.progress
"""
from __future__ import annotations

import re
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from ..cli.arguments import build_parser
from ..cli.planning import check_size, dry_run_lines, settings, tile_plan, which_model
from ..cli.running import Command, load_model, run_all
from ..cli.upscale import plan_command
from ..images import read_parameters
from .form import Upload, present
from .jobs import Ticket

WEB_MAX_PIXELS = 16_000_000  # the page's default input limit (the CLI's --max-pixels; serve --max-pixels)
WEB_MAX_UPLOAD_MB = 50
KEEP_S = 24 * 3600  # job folders (uploads, outputs) older than this are deleted (``prune``)


@dataclass(frozen=True)
class ServerOptions:
    """What ``python -m sdup serve`` was started with: the weights and the limits, the same for every job."""
    weights: str
    config: str | None = None
    vae: str | None = None
    model: str = "auto"
    device: str | None = None
    max_pixels: int = WEB_MAX_PIXELS
    max_upload_mb: float = WEB_MAX_UPLOAD_MB
    workdir: Path = Path("outputs/web")

    def argv(self) -> list[str]:
        """The upscale arguments every job shares: weights, limits, PNG outputs, no progress bars."""
        out = ["--weights", self.weights, "--model", self.model, "--max-pixels", str(self.max_pixels),
               "--format", "png", "--quiet"]
        for flag, value in (("--config", self.config), ("--vae", self.vae), ("--device", self.device)):
            if value:
                out += [flag, value]
        return out


@dataclass(frozen=True)
class Request:
    """One job: the staged uploads, the form's arguments (``form.form_argv``) and the job's folder."""
    uploads: list[Upload]
    form: list[str]
    folder: Path


@dataclass(frozen=True)
class Output:
    name: str                   # the upload's name
    input: Path                 # the staged input
    path: Path                  # the written PNG
    parameters: dict


class Runner:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.upscaler, _ = which_model(self.args(["startup-check.png"], []))  # the CLI's message for bad weights
        self._model, self._model_key = None, None
        self._lock = threading.Lock()

    def args(self, inputs: list, form: list[str], output: Path | None = None):
        """The upscale command's arguments (a ``UsageError`` with the CLI's line for a bad value)."""
        argv = [*map(str, inputs), "-o", str(output or self.options.workdir), *self.options.argv(), *form]
        args = build_parser().parse_args(argv)
        args.argv = argv
        return args

    def names(self, request: Request, outputs=()) -> dict:
        """The page's names for the paths of a job (its messages and plan lines name no server path)."""
        names = {str(u.path): u.name for u in request.uploads}
        names.update({str(p): p.name for p in outputs})
        return names

    def plan(self, request: Request) -> list[str]:
        """The dry run of the job: a line per input (output size, tiles, peak memory) and the model's settings."""
        args = self.args([u.path for u in request.uploads], [*request.form, "--dry-run"], request.folder / "out")
        planned = plan_command(args)
        lines = dry_run_lines(args, planned.upscaler, planned.meta, planned.scale, planned.items, planned.outputs)
        return [present(line, self.names(request, planned.outputs)) for line in lines]

    def model(self, args, upscaler):
        """The loaded weights, loaded again only for another dtype; the memory format recorded as the CLI does."""
        key = (args.dtype, args.memory_format)
        with self._lock:
            if self._model_key != key:
                self._model = None  # free the old one first
                self._model = load_model(args, upscaler), args.memory_format_used
                self._model_key = key
            model, args.memory_format_used = self._model
        return model

    def run(self, ticket: Ticket) -> list[Output]:
        """Upscale every input of the ticket's request, one after another, as ``python -m sdup upscale`` does."""
        request: Request = ticket.request
        out = request.folder / "out"
        args = self.args([u.path for u in request.uploads], request.form, out)
        planned = plan_command(args)
        upscaler, progress = planned.upscaler, ticket.progress
        model = self.model(args, upscaler)
        for it in planned.items:
            check_size(it, upscaler, model)
        chosen = settings(args, upscaler, model)
        command = Command(upscaler, model, planned.scale, chosen, planned.prompt, planned.negative,
                          on_step=progress.on_step)
        todo = list(zip(planned.items, planned.outputs))
        try:
            with counting_calls(model.unet, progress.on_call):
                for k, (it, path) in enumerate(todo):
                    plan = tile_plan(args, upscaler, model, it, it.size, planned.scale, chosen)
                    progress.start_image(k, len(todo), chosen["steps"], plan.latent_tiles)
                    run_all(args, replace(command, todo=[(it, path)]))
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)  # cancelled or failed: no output of this job stays
            raise
        names = self.names(request)
        return [Output(names[str(it.path)] + ("" if it.index is None else f"[{it.index}]"), it.path, path,
                       read_parameters(path) or {}) for it, path in todo]


@contextmanager
def counting_calls(module, hook):
    """``hook()`` before every forward of ``module`` (the tiles of a step; where cancel also looks)."""
    handle = module.register_forward_pre_hook(lambda *_: hook())
    try:
        yield
    finally:
        handle.remove()


def prune(workdir: Path, keep_s: float = KEEP_S, now: float | None = None) -> int:
    """Delete the job folders (``Page.folder``: 32 hex digits) not touched for ``keep_s`` seconds; returns how many.
    Gradio's own upload cache is Gradio's to clean (``delete_cache``)."""
    now = time.time() if now is None else now
    old = [d for d in workdir.iterdir() if d.is_dir() and re.fullmatch(r"[0-9a-f]{32}", d.name)
           and now - d.stat().st_mtime > keep_s] if workdir.is_dir() else []
    for d in old:
        shutil.rmtree(d, ignore_errors=True)
    return len(old)
