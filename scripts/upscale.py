#!/usr/bin/env python
"""Upscale images with the Stable Diffusion upscalers: a thin wrapper of ``python -m sdup upscale``.

See ``python scripts/upscale.py --help`` (the code and documentation are in ``sdup/cli/``).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdup.cli import upscale_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(upscale_main(prog="scripts/upscale.py"))
