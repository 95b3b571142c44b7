"""Resume on the command line: a run SIGKILLed mid-step (a UNet call, tiled or not), mid-save (the state's temporary
file written, not renamed) or during the decode, then run again, ends on the output of an uninterrupted run, having
redone only the steps since its last save; for the three upscalers, scripts/txt2img.py, each image of a folder, and
the sampler families.  The kill points are deterministic (tests/resume_driver.py), not timed."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import resume_driver
from helpers import FIXTURES
from sdup import cli
from sdup import images as files

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
X4 = ["--weights", FIXTURES / "x4" / "model.ckpt", "--config", FIXTURES / "x4" / "config.yaml"]
X2 = ["--weights", FIXTURES / "latent_upscaler" / "diffusers", "--vae", FIXTURES / "sd1" / "diffusers" / "vae"]
SR = ["--weights", FIXTURES / "stablesr" / "model.ckpt", "--config", FIXTURES / "stablesr" / "config.yaml",
      "--vae", FIXTURES / "stablesr" / "cfw_vae.ckpt", "--input-size", "32"]
SD1 = ["--weights", FIXTURES / "sd1" / "model.ckpt", "--config", FIXTURES / "sd1" / "config.yaml",
       "--prompt-ids", "254,10,20,255", "--height", "32", "--width", "48", "--quiet"]
STEPS = 6
COMMON = ["--steps", str(STEPS), "--quiet", "--seed", "5"]

# name: (command, arguments, kill point, --checkpoint-every)
CASES = {
    "x4 ddim, mid-step": ("upscale", [*X4, *COMMON], "unet:4", 2),
    "x4 plms tiled, mid-step in a tile": ("upscale", [*X4, *COMMON, "--sampler", "plms", "--tile", "16",
                                                      "--tile-overlap", "8", "--vae-tile", "16"], "unet:11", 2),
    "x4 euler_a, mid-save": ("upscale", [*X4, *COMMON, "--sampler", "euler_a"], "save:2", 2),
    "x4 ddim, during the decode": ("upscale", [*X4, *COMMON], "decode", 4),
    "x2 lms, mid-step": ("upscale", [*X2, *COMMON, "--sampler", "lms"], "unet:5", 3),
    "x2 dpmpp_2m, mid-save": ("upscale", [*X2, *COMMON, "--sampler", "dpmpp_2m"], "save:1", 3),
    "x2 euler, during the decode": ("upscale", [*X2, *COMMON], "decode", 5),
    "x4 ddim, during the output's write": ("upscale", [*X4, *COMMON], "write", 4),
    "stablesr ddpm, mid-step": ("upscale", [*SR, *COMMON], "unet:5", 1),
    "txt2img dpmpp_2m, mid-step": ("txt2img", [*SD1, "--steps", str(STEPS), "--sampler", "dpmpp_2m"], "unet:4", 2),
    "txt2img ddim eta, mid-save": ("txt2img", [*SD1, "--steps", str(STEPS), "--eta", "0.5"], "save:2", 2),
}


def rgb(h, w, seed=0):
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


@pytest.fixture
def photo(tmp_path):
    Image.fromarray(rgb(16, 24, 0)).save(tmp_path / "a.png")
    return tmp_path / "a.png"


def killed(kill: str, command: str, args) -> list[int]:
    """Run in a subprocess with the kill point; -> the step counts it finished (``done I`` lines)."""
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "resume_driver.py"), kill, command, *map(str, args)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == -9, (r.returncode, r.stdout, r.stderr)  # SIGKILL
    return [int(m) for m in re.findall(r"^done (\d+)$", r.stdout, re.M)]


def in_process(monkeypatch, capsys, command: str, args, kill: str = "none"):
    """Run in this process (one thread, as the subprocess) -> (exit code, step counts done, stderr)."""
    with monkeypatch.context() as m:
        resume_driver.instrument(kill, setattr_=m.setattr)
        try:
            code = cli.main(["upscale", *map(str, args)]) if command == "upscale" else txt2img_script().main(
                [*map(str, args)])
        except SystemExit as e:
            code = e.code
    out, err = capsys.readouterr()
    return code, [int(v) for v in re.findall(r"^done (\d+)$", out, re.M)], err


def txt2img_script():
    spec = importlib.util.spec_from_file_location("txt2img_script", ROOT / "scripts" / "txt2img.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def same_output(a: Path, b: Path) -> None:
    """The same image bit for bit: the same file bytes, or for upscale outputs (which record the seconds they took and
    the command, here with another -o) the same pixels and the same parameters but those."""
    if a.read_bytes() == b.read_bytes():
        return
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    pa, pb = files.read_parameters(a), files.read_parameters(b)
    for p in (pa, pb):
        p.pop("seconds"), p.pop("command"), p.pop("output", None)
    assert pa == pb


def expected_resume(kill: str, done: int, every: int) -> int:
    """Where the rerun must resume: after the last save that finished before the kill."""
    if kill in ("decode", "write"):
        return STEPS  # the last step is always saved: the decode is redone, no step
    last = done // every * every
    return last - every if kill.startswith("save") else last


@pytest.mark.parametrize("case", CASES)
def test_killed_run_resumes_to_the_same_bytes(case, photo, tmp_path, monkeypatch, capsys):
    command, args, kill, every = CASES[case]
    if X2[1] in args:  # the x2 model's smallest input
        Image.fromarray(rgb(64, 64, 2)).save(photo)
    io = [photo] if command == "upscale" else []
    ref_out, out = tmp_path / "ref.png", tmp_path / "out" / "a.png"
    flag = "-o" if command == "upscale" else "--out"
    code, steps, err = in_process(monkeypatch, capsys, command, [*io, flag, ref_out, *args])
    assert code == 0 and steps == list(range(1, STEPS + 1)), err
    state = out.parent / f".{out.name}.sdup-state"
    done = killed(kill, command, [*io, flag, out, *args, "--checkpoint-every", every])
    assert not out.exists() and state.exists() == (expected_resume(kill, max(done), every) > 0)
    code, steps, err = in_process(monkeypatch, capsys, command, [*io, flag, out, *args, "--checkpoint-every", every])
    assert code == 0, err
    start = expected_resume(kill, max(done), every)
    label = photo if command == "upscale" else out
    if start:
        assert f"note: resumed {label} at step {start}/{STEPS}" in err
    redone = max(done) - start
    assert steps == list(range(start + 1, STEPS + 1)) and redone <= every, (done, steps)
    same_output(ref_out, out)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no state, no partial file left


def test_each_image_of_a_folder_resumes(photo, tmp_path, monkeypatch, capsys):
    """Killed during the second image of a folder: the first output is written and its state gone; the rerun does
    the first again (its output is replaced, no state) and resumes the second."""
    Image.fromarray(rgb(24, 16, 1)).save(tmp_path / "b.png")
    args = [*X4, *COMMON, "--checkpoint-every", "2"]
    code, _, err = in_process(monkeypatch, capsys, "upscale", [tmp_path, "-o", tmp_path / "ref", *args])
    assert code == 0, err
    out = tmp_path / "out"
    done = killed(f"unet:{STEPS + 5}", "upscale", [tmp_path, "-o", out, *args])
    # the claim of the killed run stays (a lock, taken over by the next run)
    assert done == [*range(1, STEPS + 1), 1, 2, 3, 4] and sorted(p.name for p in out.iterdir()) == \
        [".b_x4.png.claim", ".b_x4.png.sdup-state", "a_x4.png"]
    code, steps, err = in_process(monkeypatch, capsys, "upscale", [tmp_path, "-o", out, *args])
    assert code == 0 and steps == [*range(1, STEPS + 1), 5, 6], err
    assert f"note: resumed {tmp_path / 'b.png'} at step 4/{STEPS}" in err and "a.png at step" not in err
    for name in ("a_x4.png", "b_x4.png"):
        same_output(tmp_path / "ref" / name, out / name)
    assert sorted(p.name for p in out.iterdir()) == ["a_x4.png", "b_x4.png"]


def test_ctrl_c_keeps_the_state_and_what_changed_is_named(photo, tmp_path, monkeypatch, capsys):
    """Ctrl-C after step 3: exit 2, the state kept. A changed input, other weights' bytes or another seed: not
    resumed, a note names the change; --no-resume: started over without a note; the result is a fresh run's."""
    out = tmp_path / "o.png"
    args = [photo, "-o", out, *X4, *COMMON, "--checkpoint-every", "1"]
    state = tmp_path / ".o.png.sdup-state"

    def interrupted():
        code, steps, err = in_process(monkeypatch, capsys, "upscale", args, kill="interrupt:3")
        assert code == 2 and steps == [1, 2, 3] and "interrupted" in err and state.exists(), err
    interrupted()
    Image.fromarray(rgb(16, 24, 7)).save(photo)
    code, steps, err = in_process(monkeypatch, capsys, "upscale", args)
    assert code == 0 and steps == list(range(1, STEPS + 1)) and "the input changed since it was saved" in err, err
    assert not state.exists()
    interrupted()
    code, steps, err = in_process(monkeypatch, capsys, "upscale", [*args, "--seed", "6"])
    assert code == 0 and steps == list(range(1, STEPS + 1)) and "changed since it was saved" in err, err
    interrupted()
    code, steps, err = in_process(monkeypatch, capsys, "upscale", [*args, "--no-resume"])
    assert code == 0 and steps == list(range(1, STEPS + 1)) and "resum" not in err, err
    code, _, err = in_process(monkeypatch, capsys, "upscale", [*args, "--checkpoint-every", "-1"])
    assert code == 2 and "--checkpoint-every" in err and len(err.strip().splitlines()) == 1


def test_default_checkpoints_about_once_a_minute(photo, tmp_path, monkeypatch, capsys):
    """Without --checkpoint-every: a save once 60 s of sampling have passed (here: the clock jumps 61 s per step),
    and after the last step."""
    from sdup.pipelines import resume
    saves, clock = [], iter(range(0, 10_000, 61))
    monkeypatch.setattr(resume, "monotonic", lambda: float(next(clock)))
    real = resume.Checkpoint.save
    monkeypatch.setattr(resume.Checkpoint, "save", lambda self, state: (saves.append(state.i), real(self, state)))
    code, _, err = in_process(monkeypatch, capsys, "upscale", [photo, "-o", tmp_path / "o.png", *X4, *COMMON])
    assert code == 0 and saves == list(range(1, STEPS + 1)), err
    saves.clear()
    monkeypatch.setattr(resume, "monotonic", lambda: 0.0)  # no time passes: only the last step is saved
    code, _, err = in_process(monkeypatch, capsys, "upscale", [photo, "-o", tmp_path / "o.png", *X4, *COMMON])
    assert code == 0 and saves == [STEPS], err
    assert torch.get_num_threads() == 1


def test_torchrun_one_image_over_two_ranks_resumes(tmp_path, monkeypatch, capsys):
    """One image whose latent tiles are split over two ranks (torchrun, gloo): the main rank writes the one state,
    rank 0 killed mid-step, the rerun (both ranks resume from the main rank's state) ends on the single-process
    pixels."""
    Image.fromarray(rgb(16, 20, 3)).save(tmp_path / "big.png")
    args = [tmp_path / "big.png", *X4, "--steps", "4", "--quiet", "--seed", "3", "--tile", "8", "--tile-overlap", "4",
            "--checkpoint-every", "1"]
    code, _, err = in_process(monkeypatch, capsys, "upscale", [*args, "-o", tmp_path / "ref.png"])
    assert code == 0, err
    out = tmp_path / "out.png"

    def torchrun(kill):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               str(ROOT / "tests" / "resume_driver.py"), kill, "upscale", *map(str, args), "-o",
                               str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                                   "SDUP_DIST_TIMEOUT": "30"})
    first = torchrun("unet:15")  # rank 0 has 6 of the 12 tiles: its 15th call is in step 3
    assert first.returncode != 0 and re.findall(r"^done (\d+)$", first.stdout, re.M) == ["1", "2"], first.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.png.sdup-state", "big.png", "ref.png"]
    second = torchrun("none")
    assert second.returncode == 0, second.stderr[-2000:]
    assert re.findall(r"^done (\d+)$", second.stdout, re.M) == ["3", "4"]
    assert second.stderr.count("resumed") == 1 and f"resumed {tmp_path / 'big.png'} at step 2/4" in second.stderr
    same_output(tmp_path / "ref.png", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.png", "out.png", "ref.png"]
