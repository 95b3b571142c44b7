#!/usr/bin/env python
"""Upscale images with the Stable Diffusion upscalers: a thin wrapper of ``python -m sdup upscale``.

See ``python scripts/upscale.py --help`` (the code and documentation are in ``sdup/cli/``).
"""
import signal  # noqa: I001  (Ctrl-C / SIGTERM held back first: start-up ends in one line too, sdup.fileio.run_main)
signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM)) if hasattr(signal, "pthread_sigmask") else None

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdup.fileio import run_main  # noqa: E402  (no torch yet)


def load():
    from sdup.cli import upscale_main
    return lambda: upscale_main(prog="scripts/upscale.py")


if __name__ == "__main__":
    run_main(load)
