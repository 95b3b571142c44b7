#!/usr/bin/env python
"""Convert checkpoints: original single file <-> diffusers folder <-> sdup safetensors.

    python scripts/convert.py sd-v1-4.ckpt sd-v1-4-diffusers/          # -> diffusers folder
    python scripts/convert.py stable-diffusion-x4-upscaler/ x4.safetensors   # -> original layout
    python scripts/convert.py sd-v1-4.ckpt sd14.sdup.safetensors       # -> sdup's own file
"""
import signal  # noqa: I001  (Ctrl-C / SIGTERM held back first: start-up ends in one line too, sdup.fileio.run_main)
signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, signal.SIGTERM)) if hasattr(signal, "pthread_sigmask") else None

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdup.fileio import run_main  # noqa: E402  (no torch yet)


def load():
    from sdup.cli import main
    return lambda: main(["convert", *sys.argv[1:]])


if __name__ == "__main__":
    run_main(load)
