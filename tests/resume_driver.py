"""Test driver for resumed runs (tests/test_resume_cli.py): the upscale CLI or scripts/txt2img.py with deterministic
kill points and a log of the steps run.

    python tests/resume_driver.py KILL upscale ARGS...   # KILL: none | unet:K | save:K | decode | write | interrupt:K
    python tests/resume_driver.py KILL txt2img ARGS...

``unet:K`` SIGKILLs the process when the UNet is called for the K-th time (mid-step; a tile's call when tiled);
``save:K`` during the K-th save of the resume state, its temporary file written but not yet renamed; ``decode`` when
the decode starts (after the last step); ``write`` during the output's write (its temporary file written, not
renamed; upscale only); ``interrupt:K`` raises KeyboardInterrupt (Ctrl-C) once step K is done.
Every finished sampler step prints ``done I`` (I steps done) on stdout, flushed, before its state may be saved, so
the test counts the steps each run did.  ``instrument`` does the same in-process (for the runs that are not killed).
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main_rank() -> bool:
    """Not a torchrun rank other than 0: under torchrun only rank 0 kills itself and logs its steps, so the kill
    point stays deterministic (the other ranks are then stopped by torchrun)."""
    return os.environ.get("RANK", "0") == "0"


def die() -> None:
    if main_rank():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def instrument(kill: str, log=print, setattr_=setattr) -> None:
    """Patch sdup's job runner and resume writes: the kill point ``kill`` and the step log (see the docstring)."""
    from sdup.pipelines import job as job_module, resume
    kind, _, k = kill.partition(":")
    k = int(k or 0)
    counts = {"unet": 0, "save": 0}
    real_run, real_write = job_module.run, resume.atomic_write  # noqa: F841

    def unet_call(module, inputs):
        if type(module).__name__ in ("UNet", "KUNet"):
            counts["unet"] += 1
            if kind == "unet" and counts["unet"] == k:
                die()

    def run(job, group=None, checkpoint=None):
        if checkpoint is not None:
            save_when_due = checkpoint.step

            def step(state):
                log(f"done {state.i}")
                save_when_due(state)
                if kind == "interrupt" and state.i == k:
                    raise KeyboardInterrupt
            checkpoint.step = step
        if kind == "decode" and job.decode is not None:
            job.decode = lambda z: die()
        return real_run(job, group, checkpoint)

    def atomic_write(path, write, **kw):
        counts["save"] += 1
        if kind == "save" and counts["save"] == k:
            def half(tmp):
                write(tmp)
                die()
            return real_write(path, half, **kw)
        return real_write(path, write, **kw)

    if kind == "write":  # the output's write: its temporary file written, not renamed
        from sdup.images import write as image_write
        real_image_write = image_write.atomic_write

        def write_then_die(path, write, **kw):
            return real_image_write(path, lambda tmp: (write(tmp), die()), **kw)
        setattr_(image_write, "atomic_write", write_then_die)
    for module in _runners():
        setattr_(module, "run", run)
    setattr_(resume, "atomic_write", atomic_write)
    if kind == "unet":
        import torch
        torch.nn.modules.module.register_module_forward_pre_hook(unet_call)


def _runners():
    """The modules whose ``run`` the CLIs call."""
    from sdup.cli import running
    from sdup.pipelines import job
    return [running, job]


def main(argv: list[str]) -> int:
    kill, command, args = argv[0], argv[1], argv[2:]
    sys.path.insert(0, str(ROOT))
    instrument(kill, log=lambda line: print(line, flush=True) if main_rank() else None)
    if command == "upscale":
        from sdup.cli import upscale_main
        return upscale_main(args)
    sys.path.insert(0, str(ROOT / "scripts"))
    import txt2img
    from sdup.fileio import sigterm_as_interrupt
    with sigterm_as_interrupt():
        return txt2img.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
