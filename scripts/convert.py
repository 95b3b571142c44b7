#!/usr/bin/env python
"""Convert checkpoints: original single file <-> diffusers folder <-> sdup safetensors.

    python scripts/convert.py sd-v1-4.ckpt sd-v1-4-diffusers/          # -> diffusers folder
    python scripts/convert.py stable-diffusion-x4-upscaler/ x4.safetensors   # -> original layout
    python scripts/convert.py sd-v1-4.ckpt sd14.sdup.safetensors       # -> sdup's own file
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdup.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
