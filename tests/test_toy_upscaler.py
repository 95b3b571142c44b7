"""A fifth upscaler is one file plus one row of ``UPSCALERS``: a copy of ``sdup/`` gets a toy model (the x4 model
without noise augmentation, under another name, on the x4 weights) and one more row in ``pipelines/registry.py``;
the command line runs it (dry run, a real run, ``--rerun``, two ranks under torchrun) with its package unchanged."""
from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from helpers import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
X4 = ["--weights", str(FIXTURES / "x4" / "model.ckpt"), "--config", str(FIXTURES / "x4" / "config.yaml")]
FAST = ["--steps", "2", "--quiet", "--seed", "3", "--prompt-ids", "254,7,255"]

TOY = '''"""A toy upscaler: the x4 model without noise augmentation (noise level 0), loading the x4 weights."""
import dataclasses

from .x4 import UPSCALER as X4


def settings(opts) -> dict:
    return dict(X4.settings(opts), noise_level=0)


UPSCALER = dataclasses.replace(X4, name="x4_plain", settings=settings, describe=lambda s: "no noise augmentation")
'''


def with_toy(tmp_path: Path) -> Path:
    """A copy of sdup/ with the toy file and its row; returns the folder to put on PYTHONPATH."""
    root = tmp_path / "src"
    shutil.copytree(ROOT / "sdup", root / "sdup", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "sdup" / "pipelines" / "x4_plain.py").write_text(TOY)
    registry = root / "sdup" / "pipelines" / "registry.py"
    text = registry.read_text()
    assert text.count('    "stablesr",\n)') == 1
    registry.write_text(text.replace('    "stablesr",\n)', '    "stablesr",\n    "x4_plain",\n)'))
    return root


def command(root: Path, *args, torchrun: bool = False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "SDUP_DIST_TIMEOUT": "30"}
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "sdup"] \
        if torchrun else [sys.executable, "-m", "sdup"]
    return subprocess.run([*head, "upscale", *map(str, args)], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)


def test_a_fifth_upscaler_needs_no_cli_change(tmp_path):
    root = with_toy(tmp_path)
    Image.fromarray((np.random.RandomState(0).rand(16, 20, 3) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    toy = [*X4, *FAST, "--model", "x4_plain", "--tile", "8", "--tile-overlap", "4"]
    dry = command(root, tmp_path / "a.png", "-o", tmp_path / "dry.png", *toy, "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "model: x4_plain" in dry.stdout and "no noise augmentation" in dry.stdout, dry.stdout
    assert "latent tiles 12" in dry.stdout, dry.stdout  # 16 x 20 latent, 8-px tiles, overlap 4: 3 x 4
    first = command(root, tmp_path / "a.png", "-o", tmp_path / "one.png", *toy)
    assert first.returncode == 0, first.stderr[-2000:]
    params = json.loads(Image.open(tmp_path / "one.png").text["parameters"])
    assert params["noise_level"] == 0 and params["command"][params["command"].index("--model") + 1] == "x4_plain"
    assert params["tiling"] == json.loads(dry.stdout.splitlines()[0].split("; tiling ", 1)[1])
    again = command(root, "--rerun", tmp_path / "one.png", "-o", tmp_path / "again.png")
    two = command(root, tmp_path / "a.png", "-o", tmp_path / "two.png", *toy, torchrun=True)
    assert again.returncode == 0 and two.returncode == 0, (again.stderr[-2000:], two.stderr[-2000:])
    one = np.asarray(Image.open(tmp_path / "one.png"))
    assert np.array_equal(one, np.asarray(Image.open(tmp_path / "again.png")))
    assert np.array_equal(one, np.asarray(Image.open(tmp_path / "two.png")))
    cli = sorted(p.name for p in (ROOT / "sdup" / "cli").glob("*.py"))
    match, mismatch, errors = filecmp.cmpfiles(ROOT / "sdup" / "cli", root / "sdup" / "cli", cli, shallow=False)
    assert match == cli and not mismatch and not errors
