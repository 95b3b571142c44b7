"""Resumable sampling: a run keeps its state in a hidden file next to its output, and the same run started again
continues from it, bit for bit.

    checkpoint = Checkpoint(state_path(out), {"weights": sha256, "input": sha256}, every=None)
    result = run(job, checkpoint=checkpoint)     # resumes from the file when it fits this job, saves as it goes
    write(out, result); checkpoint.remove()      # the output is in place: the state is no longer needed

The state (``torch.save``, loaded with ``weights_only``): the steps done, the latents after them, the sampler's
history (``SamplerState``), the generators' states (the per-step noise continues where it stopped), and the
fingerprint of what the latents depend on.  The fingerprint = the caller's entries (the weights, config and input
files' sha256: what the denoiser holds and this module cannot see) + the job's own: the sdup and torch versions,
the device, the sampler and its options, the grid, the start noise, the conditioning tensors, the tile plan and the
recorded parameters.  A state whose fingerprint differs from the job's is not used: the note names what changed.
The thread count is not in it (the result is right at any count, bit-identical at the same one): a resume at
another count says so in its note.

When: after every ``every`` steps, or (``every`` None) once ``seconds`` of sampling have passed since the last save,
and always after the last step (the decode after it can be long).  ``every`` 0: never.  Writes go through
``atomic_write``: a kill during a save leaves the previous state whole.  Under torchrun with one input split over
the ranks, the main rank reads and writes the file and sends the state to the others (``group``).
"""
from __future__ import annotations

import hashlib
import json
from time import monotonic
from pathlib import Path
from typing import Any, Callable

import torch

from ..diffusion.samplers import SamplerState
from ..fileio import atomic_write, remove_abandoned

Tensor = torch.Tensor
FORMAT = "sdup-resume/1"
DEFAULT_SECONDS = 60.0  # the default checkpoint interval: about a minute of sampling


def state_path(output: str | Path) -> Path:
    """The hidden state file of an output: ``.NAME.sdup-state`` next to it."""
    output = Path(output)
    return output.with_name(f".{output.name}.sdup-state")


def digest(value: Any) -> str:
    """sha256 of tensors (dtype, shape and bytes) and plain values (str, numbers, None) in nested dicts / lists /
    tuples; another object counts by its type alone (its repr may hold a memory address, which changes every run):
    what such an object holds must be named by the caller's fingerprint entries."""
    h = hashlib.sha256()

    def feed(v):
        if isinstance(v, Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                h.update(f"<{k}>".encode())
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(f"[{len(v)}]".encode())
            for x in v:
                feed(x)
        elif v is None or isinstance(v, (str, int, float, bool)):
            h.update(repr(v).encode())
        else:
            h.update(f"<{type(v).__module__}.{type(v).__qualname__}>".encode())
    feed(value)
    return h.hexdigest()


def job_fingerprint(job) -> dict:
    """What the sampled latents of ``job`` depend on that the job itself holds (see the module docstring)."""
    from .. import __version__
    plan = job.plan.parameters() if job.plan is not None else None
    return {"sdup version": __version__, "torch version": str(torch.__version__), "device": str(job.x_T.device),
            "sampler": job.sampler.name, "sampler options": digest(job.options), "grid": digest(job.grid),
            "start noise": digest([job.x_T, job.init_scale]), "conditioning": digest(job.extra_args),
            "tile plan": digest(plan), "parameters": digest(json.dumps(job.parameters, sort_keys=True, default=str))}


def _generators(job) -> list:
    g = job.generators
    return [] if g is None else list(g) if isinstance(g, (list, tuple)) else [g]


def _steps(job) -> int:
    """The number of steps the job's sampler runs (DDPM without a grid: the denoiser's whole chain)."""
    if job.grid is None:
        return int(job.denoiser.num_timesteps)
    return len(job.grid) - (0 if job.sampler.discrete else 1)


class Checkpoint:
    """The resumable state of one job's sampling, in the file ``path`` (see the module docstring).

    ``fingerprint``: the caller's entries (name -> a hash or value); ``resume`` False: start over (``--no-resume``);
    ``writer`` False: this rank neither reads nor writes the file (torchrun: the main rank does, ``group``);
    ``label``: how the notes name the input; ``note``: where they go."""

    def __init__(self, path: str | Path, fingerprint: dict, *, every: int | None = None,
                 seconds: float = DEFAULT_SECONDS, resume: bool = True, writer: bool = True, group=None,
                 label: str = "", note: Callable[[str], None] = print):
        if every is not None and every < 0:
            raise ValueError(f"checkpoint every must be >= 0 steps (0 = never), got {every}")
        self.path, self.extra, self.every, self.seconds = Path(path), dict(fingerprint), every, seconds
        self.resume, self.writer, self.group, self.label, self.note = resume, writer, group, label, note
        self.fingerprint: dict = {}
        self.job, self.n, self.last = None, 0, monotonic()
        self.resumed_at: int | None = None

    # ---- start: a fresh state or the saved one

    def start(self, job) -> SamplerState:
        """The state ``job`` starts from: the saved one when it fits the job (its generators restored, a note
        printed), else a fresh one (a note says why a saved one was not used)."""
        self.job, self.n = job, _steps(job)
        self.fingerprint = {**self.extra, **job_fingerprint(job)}
        saved = self._read() if self.writer else None
        if self.group is not None:  # torchrun, one input over the ranks: the main rank's state everywhere
            from ..distributed import exchange
            saved = exchange(lambda: saved, self.group)[0]
        self.last = monotonic()
        if saved is None:
            return SamplerState()
        for g, s in zip(_generators(job), saved["generators"]):
            g.set_state(s)
        device = job.x_T.device
        self.resumed_at = saved["step"]
        if self.writer:
            threads = saved.get("threads")
            other = f" (saved at {threads} threads, now {torch.get_num_threads()}: the last bits may differ from an " \
                    "uninterrupted run)" if threads not in (None, torch.get_num_threads()) else ""
            self.note(f"resumed {self.label or self.path} at step {saved['step']}/{self.n}{other}")
        return SamplerState(saved["step"], saved["x"].to(device), [h.to(device) for h in saved["history"]])

    def _read(self) -> dict | None:
        """The saved state when there is one that fits this job; None otherwise (with a note when one is refused)."""
        if not self.path.exists():
            return None
        if not self.resume:
            self.remove()
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- truncated or foreign: any unpickling error means "not usable"
            return self._refuse(f"it is not readable ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})")
        why = self._mismatch(saved)
        return self._refuse(why) if why else saved

    def _mismatch(self, saved) -> str | None:
        """Why ``saved`` does not fit this job, or None."""
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            return "it is not an sdup state of this version"
        old = saved.get("fingerprint")
        old = old if isinstance(old, dict) else {}
        for key in [*self.fingerprint, *(k for k in old if k not in self.fingerprint)]:  # the caller's first
            if old.get(key) != self.fingerprint.get(key):
                return f"the {key} changed since it was saved"
        x, step, history = saved.get("x"), saved.get("step"), saved.get("history")
        like = (tuple(self.job.x_T.shape), self.job.x_T.dtype)
        if not (isinstance(step, int) and 0 <= step <= self.n and isinstance(history, list)
                and all(isinstance(t, Tensor) and (tuple(t.shape), t.dtype) == like for t in [x, *history])):
            return "its step, latents or history do not fit this job"
        gens, ours = saved.get("generators"), [g.get_state() for g in _generators(self.job)]
        if not (isinstance(gens, list) and len(gens) == len(ours) and all(
                isinstance(t, Tensor) and (t.shape, t.dtype) == (o.shape, o.dtype) for t, o in zip(gens, ours))):
            return "its generators do not fit this job"
        return None

    def _refuse(self, why: str) -> None:
        self.note(f"not resuming {self.label or self.path} from {self.path.name}: {why}; starting over")
        return None

    # ---- during the run: save when due

    def step(self, state: SamplerState) -> None:
        """Called after every step: save ``state`` when it is due (see the module docstring)."""
        if not self.writer or self.every == 0:
            return
        due = state.i == self.n or (state.i % self.every == 0 if self.every else
                                    monotonic() - self.last >= self.seconds)
        if due:
            self.save(state)

    def save(self, state: SamplerState) -> None:
        """Write ``state`` with the generators' states and the fingerprint, atomically."""
        payload = {"format": FORMAT, "fingerprint": self.fingerprint, "step": state.i, "steps": self.n,
                   "threads": torch.get_num_threads(),
                   "x": state.x.detach().cpu(), "history": [h.detach().cpu() for h in state.history],
                   "generators": [g.get_state() for g in _generators(self.job)]}
        try:
            atomic_write(self.path, lambda tmp: torch.save(payload, tmp))
        except (OSError, RuntimeError) as e:  # a full disk or a file-size limit: the run goes on, unsaved
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            self.note(f"could not save the resume state {self.path.name} ({why}); going on without it")
        self.last = monotonic()

    # ---- after the output is written

    def remove(self) -> None:
        """Delete the state file and the temporary files a killed save left behind (their process is gone)."""
        if self.writer:
            self.path.unlink(missing_ok=True)
            remove_abandoned(self.path)
