"""torch.distributed (torchrun, gloo, two CPU processes on this machine): a folder sharded over the ranks and one
image's tiles split over them give the single-process pixels; a failing or vanished rank stops every rank with
one line naming it. Every process runs one thread, as torchrun's default, so the single-process reference does too."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
X4 = ["--weights", str(FIXTURES / "x4" / "model.ckpt"), "--config", str(FIXTURES / "x4" / "config.yaml")]
FAST = ["--steps", "2", "--quiet", "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "SDUP_DIST_TIMEOUT": "30"}


def torchrun(*args, nproc=2, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def single(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=240, env=ENV,
                          cwd=ROOT)


def pixels(folder: Path) -> dict:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.iterdir())}


def test_folder_and_tiles_over_two_ranks_equal_one_process(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.RandomState(0)
    for i in range(5):
        Image.fromarray((rng.rand(16, 16 + 4 * i, 3) * 255).astype(np.uint8)).save(src / f"im{i}.png")
    upscale = ROOT / "scripts" / "upscale.py"
    # a folder of 5: rounds of 2, every output written once, by the rank it was dealt to
    one = single(upscale, src, "-o", tmp_path / "one", *X4, *FAST)
    assert one.returncode == 0, one.stderr
    two = torchrun(upscale, src, "-o", tmp_path / "two", *X4, *FAST)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = pixels(tmp_path / "one"), pixels(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 5
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert two.stdout.count("wrote ") == 5  # the main rank prints every rank's line, once
    # one image, 2 x 3 latent tiles of 8 (overlap 4) on a 12 x 16 latent: the tiles of each step split over the ranks
    Image.fromarray((rng.rand(12, 16, 3) * 255).astype(np.uint8)).save(tmp_path / "big.png")
    tiles = ["--tile", "8", "--tile-overlap", "4"]
    one = single(upscale, tmp_path / "big.png", "-o", tmp_path / "t1.png", *X4, *FAST, *tiles)
    two = torchrun(upscale, tmp_path / "big.png", "-o", tmp_path / "t2.png", *X4, *FAST, *tiles)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr[-3000:])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "t1.png")), np.asarray(Image.open(tmp_path / "t2.png")))


LIBRARY = textwrap.dedent("""
    import sys, torch, sdup
    from sdup import distributed
    from sdup.pipelines.stablesr import upscale_stablesr
    from sdup.pipelines.x2_latent import upscale_latents_x2
    fixtures, what, out = sys.argv[1], sys.argv[2], sys.argv[3]
    group = distributed.from_environment()  # None in the single process
    g = torch.Generator().manual_seed(0)
    if what == "stablesr":
        d = fixtures + "/stablesr/"
        model, cfw = sdup.load(d + "model.ckpt", config=d + "config.yaml"), sdup.load(d + "cfw_vae.ckpt",
                                                                                      config=d + "cfw_vae_config.yaml")
        r = upscale_stablesr(model, cfw, torch.rand(1, 3, 12, 20, generator=g), steps=2, input_size=32, sampler="ddim",
                             guidance=3.0, negative_prompt=[3, 4, 5], seed=5, tile=8, tile_overlap=4, progress=False,
                             group=group)
    else:
        model = sdup.load(fixtures + "/latent_upscaler/diffusers")
        text = dict(prompt_embeds=torch.randn(1, 77, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g))
        r = upscale_latents_x2(model, torch.randn(1, 4, 8, 12, generator=g), **text, steps=2, guidance=1.0, seed=2,
                               tile=16, tile_overlap=8, decode=False, progress=False, group=group)
    if group is None or group.is_main:
        torch.save(dict(latents=r.latents, images=r.images, tiles=r.parameters.get("tiling")), out)
    distributed.close(group)
""")


@pytest.mark.parametrize("what", ["stablesr", "x2"])
def test_library_tile_parallel_equals_one_process(tmp_path, what):
    """upscale_stablesr / upscale_latents_x2(group=from_environment()): the same latents and images, bit for bit."""
    import torch
    script = tmp_path / "lib.py"
    script.write_text(LIBRARY)
    one = single(script, FIXTURES, what, tmp_path / "one.pt")
    two = torchrun(script, FIXTURES, what, tmp_path / "two.pt")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a["tiles"] is not None and a["tiles"]["tile"] in (8, 16)  # several tiles per step
    assert torch.equal(a["latents"], b["latents"])
    assert (a["images"] is None and b["images"] is None) or torch.equal(a["images"], b["images"])


FAULTS = textwrap.dedent("""
    import os, sys
    from sdup import distributed
    group = distributed.from_environment()
    mode = sys.argv[1]

    def work():
        if group.rank == 1 and mode == "raise":
            raise ValueError("tile 3 is cursed")
        if group.rank == 1 and mode == "die":
            os._exit(7)
        return group.rank

    try:
        print(distributed.exchange(work, group))
    except distributed.RankFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
""")


@pytest.mark.parametrize("mode,message", [("raise", "rank 1 failed: tile 3 is cursed"),
                                          ("die", "lost contact with the other ranks")])
def test_a_failing_rank_stops_every_rank_with_its_name(tmp_path, mode, message):
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    r = torchrun(script, mode, timeout=120)
    assert r.returncode != 0
    if mode == "raise":  # both ranks name rank 1 and its error
        assert r.stderr.count(message) == 2, r.stderr[-3000:]
    else:  # rank 0 is told that it lost its peer (not a hang)
        assert message in r.stderr, r.stderr[-3000:]


def test_a_plain_run_stays_one_process():
    """Without torchrun's variables (or with a world of one) no process group is joined."""
    code = "import torch; from sdup import distributed; g = distributed.from_environment(); " \
           "print(g, torch.distributed.is_initialized())"
    env = {k: v for k, v in ENV.items() if k not in ("WORLD_SIZE", "RANK")}
    for extra in ({}, {"WORLD_SIZE": "1", "RANK": "0"}):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, **extra}, cwd=ROOT)
        assert r.stdout.split() == ["None", "False"], r.stderr
