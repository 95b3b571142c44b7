"""One job at a time: a queue of ``Ticket``s served by one worker thread, positions for the waiting ones, and cancel
(a waiting ticket leaves the queue; a running one stops at its next step or model call, ``Progress``).

    queue = JobQueue(work)                  # work(ticket) -> the outputs; raises Cancelled / UsageError / anything
    ticket = queue.submit(Ticket("tab-1", request))
    queue.position(ticket)                  # 0: running, k >= 1: k-th in line, None: finished
    queue.cancel("tab-1")                   # every ticket of that browser tab

A failure that is not the user's (a bug) is logged with its traceback on the server and reaches the page as one line.
"""
from __future__ import annotations

import itertools
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from ..cli.arguments import UsageError

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
_ids = itertools.count(1)


class Cancelled(Exception):
    """Raised inside the run at the next step (or model call) after cancel."""


@dataclass
class Progress:
    """Where a running job is: image k of n, sampler step i of N, latent tile t of T (UNet calls in this step)."""
    cancel: threading.Event = field(default_factory=threading.Event)
    image: int = 0
    images: int = 1
    step: int = 0
    steps: int = 0
    tiles: int = 1
    calls: int = 0              # UNet calls since the last step

    def start_image(self, k: int, n: int, steps: int, tiles: int) -> None:
        self.image, self.images, self.steps, self.tiles, self.step, self.calls = k, n, steps, max(1, tiles), 0, 0

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled()

    def on_step(self, info: dict) -> None:
        """``Job.callback``: after step ``info['i']``."""
        self.check()
        self.step, self.calls = min(int(info["i"]) + 1, self.steps or int(info["i"]) + 1), 0

    def on_call(self, *_) -> None:
        """A forward pre-hook on the UNet: one tile of the current step."""
        self.check()
        self.calls += 1

    @property
    def tile(self) -> int:
        return (self.calls - 1) % self.tiles + 1 if self.calls else 0

    @property
    def fraction(self) -> float:
        per_image = self.step / self.steps if self.steps else 0.0
        return (self.image + per_image) / max(1, self.images)


@dataclass
class Ticket:
    session: str                # whose it is (a browser tab)
    request: Any                # what ``work`` needs
    id: int = field(default_factory=lambda: next(_ids))
    state: str = QUEUED
    progress: Progress = field(default_factory=Progress)
    message: str = ""           # the one line of a failure
    outputs: Any = None

    @property
    def finished(self) -> bool:
        return self.state in (DONE, FAILED, CANCELLED)


class JobQueue:
    def __init__(self, work: Callable[[Ticket], Any]):
        self.work = work
        self._cond = threading.Condition()
        self._waiting: list[Ticket] = []
        self.running: Ticket | None = None
        threading.Thread(target=self._loop, name="sdup-web-jobs", daemon=True).start()

    def submit(self, ticket: Ticket) -> Ticket:
        with self._cond:
            self._waiting.append(ticket)
            self._cond.notify_all()
        return ticket

    def position(self, ticket: Ticket) -> int | None:
        with self._cond:
            if ticket is self.running:
                return 0
            return self._waiting.index(ticket) + 1 if ticket in self._waiting else None

    @property
    def length(self) -> int:
        with self._cond:
            return len(self._waiting) + (self.running is not None)

    def cancel(self, session: str) -> int:
        """Cancel every ticket of ``session``: the waiting ones leave the queue now, the running one stops at its next
        step. Returns how many were cancelled."""
        with self._cond:
            mine = [t for t in [self.running, *self._waiting] if t is not None and t.session == session]
            for t in mine:
                self._cancel(t)
            return len(mine)

    def cancel_ticket(self, ticket: Ticket) -> None:
        with self._cond:
            self._cancel(ticket)

    def _cancel(self, t: Ticket) -> None:
        t.progress.cancel.set()
        if t in self._waiting:
            self._waiting.remove(t)
            t.state, t.message = CANCELLED, "cancelled before it started"

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                ticket = self.running = self._waiting.pop(0)
                ticket.state = RUNNING
            self._run(ticket)
            with self._cond:
                self.running = None

    def _run(self, ticket: Ticket) -> None:
        try:
            ticket.progress.check()
            ticket.outputs = self.work(ticket)
            ticket.state = DONE
        except Cancelled:
            ticket.state, ticket.message = CANCELLED, "cancelled (no output written)"
        except UsageError as e:
            ticket.state, ticket.message = FAILED, e.message
        except Exception as e:  # noqa: BLE001 -- a bug: the traceback goes to the server log, one line to the page
            ticket.state, ticket.message = FAILED, internal_error(e)


def internal_error(e: Exception) -> str:
    """A failure that is not the user's: its traceback to the server's log, one line for the page."""
    traceback.print_exception(e, file=sys.stderr)
    first = str(e).splitlines()[0] if str(e).strip() else ""
    return f"internal error ({type(e).__name__}: {first[:200]}); see the server log"
