"""torch.distributed (torchrun, gloo, two CPU processes on this machine): a folder sharded over the ranks, one image's
latent tiles and its tiled VAE decode split over them give the single-process pixels, bit for bit; a failing or
vanished rank stops every rank with one line naming it.

Every process runs one thread (torchrun's default), so the single-process reference does too: the tile results are
then computed by the same kernels in the same order. Each torchrun launch runs several cases, to keep the group
near half a minute (starting processes is most of its time)."""
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
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)


def single(*args):
    return subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=ROOT)


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def pixels(folder: Path) -> dict:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.iterdir())}


def test_cli_folder_and_one_image_over_two_ranks_equal_one_process(tmp_path):
    """A folder of 5 (every image tiled): dealt out in rounds of 2, each image run alone by its rank, every output
    written once. One image with 3 x 4 latent tiles and VAE tiles: the tiles of every step and of the decode split
    over the ranks, the main rank writes it."""
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.RandomState(0)
    for i in range(5):
        Image.fromarray((rng.rand(16, 16 + 4 * i, 3) * 255).astype(np.uint8)).save(src / f"im{i}.png")
    Image.fromarray((rng.rand(16, 20, 3) * 255).astype(np.uint8)).save(tmp_path / "big.png")
    upscale = ROOT / "scripts" / "upscale.py"
    tiles = ["--tile", "8", "--tile-overlap", "4"]
    vae_tiles = ["--vae-tile", "8"]
    folder = [src, "-o", tmp_path / "one", *X4, *FAST, *tiles]
    big = [tmp_path / "big.png", "-o", tmp_path / "t1.png", *X4, *FAST, *tiles, *vae_tiles]
    # the single-process references, both in one process (one start-up), beside the first torchrun
    code = "import sys; from sdup.cli import upscale_main as m; a = sys.argv[1:]; i = a.index('--'); " \
           "sys.exit(m(a[:i]) or m(a[i + 1:]))"
    one = subprocess.Popen([sys.executable, "-c", code, *map(str, folder), "--", *map(str, big)], text=True, env=ENV,
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    folder[2], big[2] = tmp_path / "two", tmp_path / "t2.png"
    two = finish(torchrun(upscale, *folder))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 5  # the main rank prints every rank's line, once
    two = finish(torchrun(upscale, *big))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1
    one = finish(one)
    assert one.returncode == 0, one.stderr
    a, b = pixels(tmp_path / "one"), pixels(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 5
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "t1.png")), np.asarray(Image.open(tmp_path / "t2.png")))


LIBRARY = textwrap.dedent("""
    import sys, torch, sdup
    from sdup import distributed
    from sdup.pipelines.stablesr import upscale_stablesr
    from sdup.tiling import tiled_decode, tiled_encode
    from sdup.pipelines.x2_latent import upscale_latents_x2
    from sdup.pipelines.x4 import upscale_x4
    fixtures, out, then = sys.argv[1], sys.argv[2], sys.argv[3]
    group = distributed.from_environment()  # None in the single process
    results = {}
    g = torch.Generator().manual_seed(0)
    d = fixtures + "/stablesr/"
    model, cfw = sdup.load(d + "model.ckpt", config=d + "config.yaml"), sdup.load(d + "cfw_vae.ckpt",
                                                                                  config=d + "cfw_vae_config.yaml")
    r = upscale_stablesr(model, cfw, torch.rand(1, 3, 12, 20, generator=g), steps=2, input_size=32, sampler="ddim",
                         guidance=3.0, negative_prompt=[3, 4, 5], seed=5, tile=8, tile_overlap=4, vae_tile=6, vae_overlap=2,
                         progress=False, group=group)
    results["stablesr"] = (r.latents, r.images, r.parameters["tiling"])
    model = sdup.load(fixtures + "/latent_upscaler/diffusers")
    text = dict(prompt_embeds=torch.randn(1, 77, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g))
    r = upscale_latents_x2(model, torch.randn(1, 4, 8, 12, generator=g), **text, steps=2, guidance=1.0, seed=2,
                           tile=16, tile_overlap=8, decode=False, progress=False, group=group)
    results["x2"] = (r.latents, r.images, r.parameters["tiling"])
    model = sdup.load(fixtures + "/x4/model.ckpt", config=fixtures + "/x4/config.yaml")
    r = upscale_x4(model, torch.rand(1, 3, 12, 20, generator=g), [5, 6, 7], steps=2, seed=1, tile=8, tile_overlap=4,
                   vae_tile=6, vae_overlap=2, progress=False, group=group)
    results["x4"] = (r.latents, r.images, r.parameters["tiling"])
    # the tiled VAE alone: batch 2, non-square, 3 x 5 tiles, the mid attention in 15 chunks of 16 queries; then one
    # tile (the second rank has none); then the tiled encoder
    vae = model.vae
    z = torch.randn(2, 4, 12, 20, generator=g)
    info = {}
    results["decode"] = tiled_decode(vae, z, tile=6, overlap=2, attn_chunk=16, info=info, group=group)
    results["decode_tiles"] = (info["tiles"], info["own_tiles"])
    results["decode_one_tile"] = tiled_decode(vae, z, tile=32, overlap=2, attn_chunk=16, group=group)
    img = torch.rand(2, 3, 24, 40, generator=g) * 2 - 1
    results["encode"] = tiled_encode(vae, img, tile=12, overlap=4, attn_chunk=16, group=group).mean
    if group is None or group.is_main:
        torch.save(results, out)
    if then == "raise":  # then a rank whose tiles raise in the decode: both ranks stop naming it
        def cursed(*args):
            raise ValueError("tile 3 is cursed")
        if group.rank == 1:
            vae.decoder.conv_out.register_forward_hook(cursed)
        try:
            tiled_decode(vae, z, tile=6, overlap=2, group=group)
        except distributed.RankFailed as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    distributed.close(group)
""")


def test_library_tiles_and_vae_over_two_ranks_equal_one_process(tmp_path):
    """upscale_stablesr / upscale_latents_x2 / upscale_x4(group=from_environment()), tiled_decode and tiled_encode:
    the same latents and images, bit for bit. Then a rank whose decode tiles raise ends both, each naming it."""
    import torch
    script = tmp_path / "lib.py"
    script.write_text(LIBRARY)
    procs = [single(script, FIXTURES, tmp_path / "one.pt", "-"), torchrun(script, FIXTURES, tmp_path / "two.pt", "raise")]
    one, two = (finish(p) for p in procs)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode != 0 and two.stderr.count("rank 1 failed: tile 3 is cursed") == 2, two.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for case in ("stablesr", "x2", "x4"):
        (la, ia, tiles), (lb, ib, _) = a[case], b[case]
        assert tiles is not None and tiles["tile"] in (8, 16), case  # several tiles per step
        assert torch.equal(la, lb), case
        assert (ia is None and ib is None) or torch.equal(ia, ib), case
    assert a["x4"][2]["vae_tile"] == 6 and a["stablesr"][2]["vae_tile"] == 6 and a["decode_tiles"] == (15, 15) and b["decode_tiles"] == (15, 8)
    for case in ("decode", "decode_one_tile", "encode"):
        assert torch.equal(a[case], b[case]), case


FAULTS = textwrap.dedent("""
    import os, sys
    from sdup import distributed
    group = distributed.from_environment()

    def work():
        if group.rank == 1:
            os._exit(7)
        return group.rank

    try:
        print(distributed.exchange(work, group))
    except distributed.RankFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
""")


def test_a_vanished_rank_stops_the_others_with_its_loss_named(tmp_path):
    script = tmp_path / "faults.py"
    script.write_text(FAULTS)
    r = finish(torchrun(script), timeout=120)
    assert r.returncode != 0
    assert "lost contact with the other ranks" in r.stderr, r.stderr[-3000:]  # rank 0 is told (not a hang)


def test_a_plain_run_stays_one_process():
    """Without torchrun's variables (or with a world of one) no process group is joined."""
    code = "import os, torch; from sdup import distributed; a = distributed.from_environment(); " \
           "os.environ.update(WORLD_SIZE='1', RANK='0'); b = distributed.from_environment(); " \
           "print(a, b, torch.distributed.is_initialized())"
    env = {k: v for k, v in ENV.items() if k not in ("WORLD_SIZE", "RANK")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.stdout.split() == ["None", "None", "False"], r.stderr


def test_exchange_tensors_in_one_process_is_the_work_itself():
    import torch
    from sdup import distributed
    t = torch.arange(6.0).view(2, 3)
    got = distributed.exchange_tensors(lambda: {"a": t, "b": (t, t.int())}, None)
    assert got["a"] is t and got["b"][1].dtype == torch.int32
    with distributed.using("G"):
        assert distributed.current() == "G"
    assert distributed.current() is None
