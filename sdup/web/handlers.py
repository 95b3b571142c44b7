"""What the page's events do (``Page``): stage the uploads, show the plan, run a job through the queue with its
progress, cancel, and show a result.  Every user mistake arrives as the CLI's one line (``UsageError``,
``UpscaleIOError``) and is shown as ``error: ...``; nothing here lets a traceback reach the page."""
import html
import time
import uuid
from pathlib import Path

import gradio as gr

from ..cli.arguments import UsageError
from ..images import UpscaleIOError
from .compare import reference, shown, zoomed_pair
from .form import allowed_extensions, fields, form_argv, present, stage_uploads
from .jobs import CANCELLED, DONE, QUEUED, JobQueue, Ticket, internal_error
from .runner import Request, Runner, prune

POLL_S = 0.25  # how often a waiting or running job's status is sent to the page


def note(text: str, state: str = "info") -> str:
    """A status line the page shows (``state``: its data-state, what the browser tests read)."""
    return f'<div class="sdup-note" data-state="{state}">{html.escape(text)}</div>'


def error(message: str) -> str:
    return f'<div class="sdup-error" data-state="error">error: {html.escape(message)}</div>'


def progress_html(ticket: Ticket) -> str:
    """The running job's bar and line: image, step and tile (before the first step: starting; after the last:
    decoding)."""
    p = ticket.progress
    text = f"image {p.image + 1} of {p.images} · step {p.step} of {p.steps} · tile {p.tile} of {p.tiles}"
    if not p.steps:
        text = "starting (the first job loads the weights)"
    elif p.step == p.steps:
        text = f"image {p.image + 1} of {p.images} · decoding"
    return (f'<div class="sdup-note" data-state="running"><progress id="sdup-progress" max="1" '
            f'value="{p.fraction:.3f}"></progress> {html.escape(text)}</div>')


class Page:
    def __init__(self, runner: Runner, queue: JobQueue):
        self.runner, self.queue = runner, queue
        self.fields = fields(runner.upscaler)
        self.allowed = allowed_extensions(runner.upscaler)
        self._pruned = 0.0

    def folder(self) -> Path:
        """A new job folder, named by the server (never by the page); yesterday's ones go (at most once an hour)."""
        if time.time() - self._pruned > 3600:
            self._pruned = time.time()
            prune(self.runner.options.workdir)
        return self.runner.options.workdir / uuid.uuid4().hex

    # -- uploads and the plan ------------------------------------------------------------------------------------

    def request(self, uploads, values) -> Request:
        """The job of the form's ``values`` (prompt, its kind, negative, its kind, then the fields')."""
        if not uploads:
            raise UsageError("no input given (upload one or more images)")
        prompt, kind, negative, negative_kind, *opts = values
        argv = form_argv(self.fields, opts, (prompt, kind), (negative, negative_kind))
        return Request(list(uploads), argv, self.folder())

    def stage(self, files, *values):
        """The upload event: the files staged under the server's names, then the plan."""
        if not files:
            return [], note("upload one or more images to see the plan")
        try:
            limit = int(self.runner.options.max_upload_mb * 2**20)
            uploads = stage_uploads([str(f) for f in files], self.folder() / "in", self.allowed, limit)
        except (UpscaleIOError, OSError) as e:
            return [], error(str(e).splitlines()[0])
        return uploads, self.plan(uploads, *values)

    def plan(self, uploads, *values) -> str:
        """The dry run of the form as it stands: output sizes, tiles and the memory estimate (no uploads: the page
        keeps what the upload event showed, which may still be on its way)."""
        if not uploads:
            return gr.skip()
        try:
            request = self.request(uploads, values)
            lines = self.runner.plan(request)
        except UsageError as e:
            return error(present(e.message, {str(u.path): u.name for u in uploads}))
        except Exception as e:  # noqa: BLE001 -- a bug: logged, one line on the page
            return error(internal_error(e))
        items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
        return f'<div id="sdup-plan-lines" data-state="plan"><b>plan</b><ul>{items}</ul></div>'

    # -- the run -------------------------------------------------------------------------------------------------

    def run(self, session: str, uploads, *values):
        """Queue the job of the tab ``session``, report its position or progress every ``POLL_S``, then its outputs
        (or its one line)."""
        skip = (gr.skip(),) * 2
        try:
            job = self.request(uploads, values)
            self.runner.plan(job)  # the checks that need no weights, before waiting in the queue
        except UsageError as e:
            yield error(present(e.message, {str(u.path): u.name for u in uploads or []})), *skip
            return
        except Exception as e:  # noqa: BLE001 -- a bug: logged, one line on the page
            yield error(internal_error(e)), *skip
            return
        ticket = self.queue.submit(Ticket(session, job))
        start = time.time()
        try:
            while not ticket.finished:
                yield self.status(ticket), *skip
                time.sleep(POLL_S)
        finally:
            if not ticket.finished:  # the tab went away: its job goes too
                self.queue.cancel_ticket(ticket)
        yield self.finished(ticket, time.time() - start)

    def status(self, ticket: Ticket) -> str:
        pos = self.queue.position(ticket)
        if ticket.state == QUEUED and pos:
            return note(f"queued: position {pos} of {self.queue.length} (one job runs at a time)", "queued")
        return progress_html(ticket)

    def finished(self, ticket: Ticket, seconds: float):
        if ticket.state == DONE:
            outputs = ticket.outputs
            names = [f"{k + 1}: {o.name}" for k, o in enumerate(outputs)]
            done = note(f"done: {len(outputs)} image{'s' * (len(outputs) > 1)} in {seconds:.1f} s", "done")
            return done, outputs, gr.update(choices=names, value=names[0])
        line = note(ticket.message, "cancelled") if ticket.state == CANCELLED else \
            error(present(ticket.message, self.runner.names(ticket.request)))
        return line, gr.skip(), gr.skip()

    def cancel(self, session: str):
        n = self.queue.cancel(session)
        return note("cancelling at the next step" if n else "nothing to cancel", "cancelling" if n else "info")

    # -- the result ----------------------------------------------------------------------------------------------

    def show(self, outputs, which, ref, cx, cy, zoom):
        """The chosen result: before/after, the zoomed pair, its parameters and the downloads."""
        if not outputs:
            return None, None, None, None
        k = int(str(which).split(":")[0]) - 1 if which else 0
        out = outputs[min(max(k, 0), len(outputs) - 1)]
        try:
            after = shown(out.path)
            before = reference(out.input, (after.height, after.width), ref, self.runner.options.max_pixels,
                               out.parameters.get("scale", self.runner.upscaler.scale), out.path)
        except (UpscaleIOError, OSError, ValueError):  # the output went missing, a bad choice from a crafted request
            return None, None, out.parameters, [str(o.path) for o in outputs]
        pair = zoomed_pair(before, after, (float(cx), float(cy)), int(zoom))
        return (before, after), pair, out.parameters, [str(o.path) for o in outputs]
