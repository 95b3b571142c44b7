"""The holes an adversarial pass found in the upscale command (issue 22, item 5), one class per section: each bad
input ends in one line and exit code 2 before any expensive work, or in a correct output; no user file is
overwritten or lost. Tiny x4 / StableSR fixtures, two steps."""
from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdup import images as files
from sdup.cli import running
from sdup.diffusion.samplers import get_sampler
from sdup.fileio import Terminated, claim, claim_holder, claim_name, fingerprint
from sdup.pipelines.job import Job, NonFiniteResult, finish
import test_images_crafted
from test_images_crafted import FAILS, READS, chunk, png
from test_upscale_cli import FAST, ROOT, SR_FAST, SR_WEIGHTS, WEIGHTS, assert_one_line_error, rgb, run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(rgb(16, 24, 0)).save(d / "a.png")
    return d


@pytest.fixture
def no_load(monkeypatch):
    """Loading the weights is the expensive work: a check that must come first fails the test if it does not."""
    def refuse(*_, **__):
        raise AssertionError("the weights were loaded before the check")
    monkeypatch.setattr(running, "load", refuse)


# ------------------------------------------------------------------------------------------------
# silently wrong output: a value the option cannot mean is refused, never replaced by the default

BAD_VALUES = [
    (WEIGHTS, "--steps", v, "--steps must") for v in ("0", "-1", "1000", "1000000000000")
] + [
    (WEIGHTS, "--guidance", v, "--guidance must") for v in ("1e308", "-1e308", "inf", "nan", "101")
] + [
    (SR_WEIGHTS, "--scale", v, "--scale must") for v in ("0", "-1", "0.5", "17", "1e308", "nan", "inf")
] + [
    (SR_WEIGHTS, "--steps", v, "--steps must") for v in ("0", "1001")
] + [
    (SR_WEIGHTS, "--guidance", v, "--guidance must") for v in ("1e308", "nan")
]


@pytest.mark.parametrize("weights, flag, value, message", BAD_VALUES)
def test_values_the_option_cannot_mean_fail_before_loading(folder, tmp_path, capsys, no_load, weights, flag, value,
                                                           message):
    out = tmp_path / "out"
    extra = SR_FAST if weights is SR_WEIGHTS else FAST
    code, stdout, err = run(capsys, folder, "-o", out, *weights, *extra, f"{flag}={value}")
    assert_one_line_error(code, stdout, err, [message], out)
    assert not out.exists()


def test_a_diverged_result_is_refused_not_written_black():
    """NaN / inf from the decoder would be clamped into a black image: ``finish`` refuses it."""
    job = Job(sampler=get_sampler("ddim"), denoiser=None, x_T=torch.zeros(1, 4, 2, 2), grid=None, extra_args={},
              decode=lambda z: torch.full((1, 3, 16, 16), math.nan))
    with pytest.raises(NonFiniteResult, match="NaN / inf"):
        finish(job, torch.zeros(1, 4, 2, 2))
    job.decode = lambda z: torch.full((1, 3, 16, 16), math.inf)
    with pytest.raises(NonFiniteResult):
        finish(job, torch.zeros(1, 4, 2, 2))
    job.decode = lambda z: torch.zeros(1, 3, 16, 16)
    assert np.allclose(finish(job, torch.zeros(1, 4, 2, 2)).images.numpy(), 0.5)


def test_a_diverged_run_ends_in_one_line_naming_the_input(folder, tmp_path, capsys, monkeypatch):
    def diverged(*_, **__):
        raise NonFiniteResult("the upscaled image holds NaN / inf values")
    monkeypatch.setattr(running, "run", diverged)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, folder, "-o", out, *WEIGHTS, *FAST)
    assert_one_line_error(code, stdout, err, [str(folder / "a.png"), "NaN / inf"], out)


# ------------------------------------------------------------------------------------------------
# existing files at the output names: the user's are kept, sdup's own outputs are not taken as inputs


def made_from(path: Path) -> str:
    return files.read_parameters(path)["input_path"]


def test_output_folder_is_the_input_folder(folder, capsys):
    """A file of the user's at an output name is kept (exit 2 before any work) unless --overwrite; the outputs are
    recognised and left out of the folder next time (no ``a_x4_x4.png``), and replaced as outputs."""
    Image.fromarray(rgb(16, 24, 1)).save(folder / "b.png")
    Image.fromarray(rgb(16, 24, 2)).save(folder / "mine.png")
    (folder / "b_x4.png").write_bytes((folder / "mine.png").read_bytes())  # the user's own b_x4.png
    kept = (folder / "b_x4.png").read_bytes()
    code, stdout, err = run(capsys, folder / "a.png", folder / "b.png", "-o", folder, *WEIGHTS, *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "b_x4.png" in err and "--overwrite" in err, err
    assert (folder / "b_x4.png").read_bytes() == kept and not (folder / "a_x4.png").exists()
    code, _, err = run(capsys, folder / "a.png", folder / "b.png", "-o", folder, *WEIGHTS, *FAST, "--overwrite")
    assert code == 0, err
    assert made_from(folder / "b_x4.png") == str((folder / "b.png").resolve())
    code, stdout, err = run(capsys, folder, "-o", folder, *WEIGHTS, *FAST)
    assert code == 0, err
    assert "2 output(s) of sdup left out (a_x4.png, b_x4.png)" in err
    assert sorted(p.name for p in folder.iterdir()) == ["a.png", "a_x4.png", "b.png", "b_x4.png", "mine.png",
                                                        "mine_x4.png"]


def test_an_output_renamed_or_copied_is_kept(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(capsys, folder / "a.png", "-o", out, *WEIGHTS, *FAST)[0] == 0
    shutil.copy(out / "a_x4.png", out / "c_x4.png")  # sdup's, but not written under this name
    shutil.copy(folder / "a.png", folder / "c.png")
    code, stdout, err = run(capsys, folder / "c.png", "-o", out, *WEIGHTS, *FAST)
    assert code == 2 and "c_x4.png: exists and is not an output sdup wrote under this name" in err, err
    assert (out / "c_x4.png").read_bytes() == (out / "a_x4.png").read_bytes()
    code, stdout, err = run(capsys, out, "-o", tmp_path / "o2", *WEIGHTS, *FAST)  # only outputs: nothing to do
    assert_one_line_error(code, stdout, err, ["no inputs", "outputs of sdup", "name a file"], tmp_path / "o2")
    assert run(capsys, out / "a_x4.png", "-o", tmp_path / "o3", *WEIGHTS, *FAST)[0] == 0  # named: taken as is


def test_skip_existing_looks_at_the_recorded_input(folder, tmp_path, capsys):
    """a.png done, a.jpg added (one output name with --format png): a.jpg is no done output; a.png keeps its name
    and is skipped; once a.png changes it is done again, with a note."""
    out = tmp_path / "out"
    assert run(capsys, folder / "a.png", "-o", out, *WEIGHTS, *FAST, "--format", "png")[0] == 0
    first = (out / "a_x4.png").read_bytes()
    Image.fromarray(rgb(16, 24, 5)).save(folder / "a.jpg", quality=95)
    code, stdout, err = run(capsys, folder, "-o", out, *WEIGHTS, *FAST, "--format", "png", "--skip-existing")
    assert code == 0, err
    assert f"skip {folder / 'a.png'}" in stdout and f"wrote {out / 'a_x4-1.png'}" in stdout
    assert (out / "a_x4.png").read_bytes() == first and made_from(out / "a_x4-1.png").endswith("a.jpg")
    Image.fromarray(rgb(16, 24, 6)).save(folder / "a.png")
    code, stdout, err = run(capsys, folder, "-o", out, *WEIGHTS, *FAST, "--format", "png", "--skip-existing")
    assert code == 0 and "changed since" in err and f"wrote {out / 'a_x4.png'}" in stdout, (stdout, err)
    assert f"skip {folder / 'a.jpg'}" in stdout
    assert files.read_parameters(out / "a_x4.png")["input_sha256"] == fingerprint(folder / "a.png")


# ------------------------------------------------------------------------------------------------
# claims: concurrent runs share the work


def test_a_claim_is_held_once_and_taken_over_from_a_dead_process(tmp_path):
    out = tmp_path / "o.png"
    with claim(out) as mine:
        assert mine and claim_name(out).exists()
        with claim(out) as again:
            assert not again
        assert claim_holder(out) == f"process {os.getpid()}"
    assert not claim_name(out).exists()
    holder = subprocess.Popen([sys.executable, "-c", CLAIM_AND_SLEEP, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with claim(out) as mine:
        assert not mine
    holder.kill()  # SIGKILL: its claim file stays behind, unlocked
    holder.wait()
    assert claim_name(out).exists()
    with claim(out) as mine:
        assert mine
    assert not claim_name(out).exists()


CLAIM_AND_SLEEP = """
import sys, time
from sdup.fileio import claim
with claim(sys.argv[1]) as mine:
    print("held" if mine else "not held", flush=True)
    time.sleep(60)
"""


def test_an_output_another_process_is_making_is_left_to_it(folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    Image.fromarray(rgb(16, 24, 1)).save(folder / "b.png")
    with claim(out / "a_x4.png"):
        code, stdout, err = run(capsys, folder, "-o", out, *WEIGHTS, *FAST, "--skip-existing")
    assert code == 0, err
    assert f"skip {folder / 'a.png'} (process {os.getpid()} is making {out / 'a_x4.png'})" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["b_x4.png"]


def test_two_concurrent_runs_share_the_work(folder, tmp_path):
    for i in range(1, 4):
        Image.fromarray(rgb(16, 24, i)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "upscale.py"), str(folder), "-o", str(out), *map(str, WEIGHTS),
           *FAST, "--skip-existing"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in "ab"]
    results = [r.communicate(timeout=300) for r in runs]
    assert all(r.returncode == 0 for r in runs), results
    wrote = [line for stdout, _ in results for line in stdout.splitlines() if line.startswith("wrote")]
    assert sorted(wrote) == sorted(f"wrote {out / n}" for n in ("1_x4.png", "2_x4.png", "3_x4.png", "a_x4.png"))
    assert sorted(p.name for p in out.iterdir()) == ["1_x4.png", "2_x4.png", "3_x4.png", "a_x4.png"]


# ------------------------------------------------------------------------------------------------
# folders are made when an output is written, and removed again by a run that fails before writing


def test_a_failed_load_leaves_no_folder(folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "new" / "sub"
    code, stdout, err = run(capsys, folder, "-o", out, *WEIGHTS, *FAST, "--device", "nonsense")
    assert code == 2 and not (tmp_path / "new").exists(), err

    def interrupted(*_, **__):
        raise KeyboardInterrupt
    monkeypatch.setattr(running, "run", interrupted)
    code, stdout, err = run(capsys, folder, "-o", out, *WEIGHTS, *FAST)
    assert code == 2 and "interrupted" in err and not (tmp_path / "new").exists(), err


# ------------------------------------------------------------------------------------------------
# --rerun: the input is fingerprinted; a tampered record ends in one line


@pytest.fixture
def made(folder, tmp_path, capsys):
    out = tmp_path / "first"
    code, _, err = run(capsys, folder / "a.png", "-o", out, *WEIGHTS, *FAST)
    assert code == 0, err
    return out / "a_x4.png"


def test_rerun_after_the_input_changed_is_refused(folder, made, tmp_path, capsys):
    assert files.read_parameters(made)["input_sha256"] == fingerprint(folder / "a.png")
    Image.fromarray(rgb(16, 24, 7)).save(folder / "a.png")
    code, stdout, err = run(capsys, "--rerun", made, "-o", tmp_path / "again.png")
    assert_one_line_error(code, stdout, err, [f"--rerun {made}", "a.png changed since the run"], tmp_path / "none")
    assert not (tmp_path / "again.png").exists()


TAMPERED = [
    {"command": "x"}, {"command": 5}, {"command": None}, {"command": []}, {"command": [1, 2]},
    {"command": ["--help"]}, {"command": ["-h"]}, {"command": ["--rerun", "x.png"]}, {"command": ["--rer", "x.png"]},
    {"command": ["--steps", "abc"]}, {"command": ["--steps", "1000000000000"]}, {"command": ["--seed", "9" * 400]},
    {"command": ["--noise-level", "1e999"]}, {"command": ["--guidance", "1e308"]}, {"command": ["--device", "meta"]},
    {"command": ["a\0b"]}, {"command": ["a"] * 2000}, {"command": ["x" * 100_000]},
    {"cwd": 5}, {"cwd": None}, {"cwd": "relative"}, {"cwd": "/a\0b"},
    {"input_path": None}, {"input_path": 5}, {"input_path": "rel.png"}, {"input_path": "/no/such.png"},
    {"input_path": "/"}, {"input_path": "/" + "x" * 5000},
    {"weights_sha256": 5}, {"weights_sha256": "0" * 64}, {"config_sha256": []}, {"input_sha256": 5},
    {"input_sha256": "0" * 64}, {"input_sha256": "x" * 100_000},
]


def test_tampered_records_end_in_one_line(made, tmp_path, capsys):
    params = files.read_parameters(made)
    rgb_ = files.load_image(made)
    target = tmp_path / "tampered.png"
    for i, change in enumerate(TAMPERED):
        record = {**params, **change}
        record = {k: v for k, v in record.items() if v is not None}
        files.write_image(target, rgb_, parameters=record)
        code, stdout, err = run(capsys, "--rerun", target, "-o", tmp_path / f"o{i}.png")
        assert code == 2, (change, stdout, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (change, err)
        assert not (tmp_path / f"o{i}.png").exists()


# ------------------------------------------------------------------------------------------------
# tracebacks: devices that do not compute, Ctrl-C / SIGTERM at any moment of the start-up

DEVICES = ["meta", "", "nonsense", "CPU", "cpu,cuda", "cpu:-1", "cuda:0:0", "-1", "lazy", "xla", "fpga", "hpu", "xpu",
           "mtia", "privateuseone", "opengl", "mkldnn", "cpu:99999999999999999999", "cuda:99"]


@pytest.mark.parametrize("device", DEVICES)
def test_devices_that_do_not_compute_are_one_line(folder, tmp_path, capsys, no_load, device):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA machine")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, folder, "-o", out, *WEIGHTS, *FAST, f"--device={device}")
    assert_one_line_error(code, stdout, err, [f"--device {device}: not available"], out)
    assert not out.exists()


def test_ctrl_c_while_loading_is_one_line(folder, tmp_path, capsys, monkeypatch):
    for error in (KeyboardInterrupt, Terminated):
        def stopped(*_, **__):
            raise error()
        monkeypatch.setattr(running, "load", stopped)
        out = tmp_path / "out"
        code, stdout, err = run(capsys, folder, "-o", out, *WEIGHTS, *FAST)
        word = "terminated" if error is Terminated else "interrupted"
        assert_one_line_error(code, stdout, err, [f"error: {word} (no partial output written)"], out)
        assert not out.exists()


@pytest.mark.parametrize("program", [["scripts/upscale.py"], ["-m", "sdup", "upscale"]])
def test_signals_during_the_start_up_are_one_line(folder, tmp_path, program):
    """Ctrl-C / SIGTERM while Python imports torch, the weights load, the inputs are read: one line, exit code 2
    (the interpreter's own first few milliseconds are Python's, before the program's first line)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for sig, word in ((signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")):
        for delay in (0.4, 1.0, 2.0):
            p = subprocess.Popen([sys.executable, *program, str(folder), "-o", str(tmp_path / "out"),
                                  *map(str, WEIGHTS), *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, cwd=ROOT, env=env)
            time.sleep(delay)
            p.send_signal(sig)
            stdout, err = p.communicate(timeout=120)
            if p.returncode == 0:  # finished before the signal: nothing to check
                continue
            assert p.returncode == 2 and err.strip() == f"error: {word} (no partial output written)", (delay, err)
            assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.partial"))


# ------------------------------------------------------------------------------------------------
# crafted weight files: headers with wrong types, impossible shapes / offsets, tampered sdup metadata


@pytest.fixture(scope="module")
def x4_safetensors(tmp_path_factory):
    from safetensors.torch import save_file
    sd = torch.load(WEIGHTS[1], weights_only=True)
    path = tmp_path_factory.mktemp("w") / "x4.safetensors"
    save_file({k: v.contiguous() for k, v in sd.get("state_dict", sd).items()}, str(path))
    return path


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def crafted(path: Path, header: dict | None, data: bytes, body: bytes | None = None) -> Path:
    body = json.dumps(header).encode() if body is None else body
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


FIELD_VALUES = ["Q9", 5, None, [], {}, -1, 2 ** 64, 1.5, [2 ** 40, 2 ** 40], [-1], ["4"], [0.5], [[1]], True,
                float("nan"), float("inf"), [0, 2 ** 70], "x" * 10_000]


def header_cases(header: dict, n: int = 24):
    """``n`` headers with one field of one tensor replaced (a bounded, seeded fuzz), and whole-header oddities."""
    rng, names = random.Random(0), sorted(k for k in header if k != "__metadata__")
    for _ in range(n):
        h = json.loads(json.dumps(header))
        name, field = rng.choice(names), rng.choice(["dtype", "shape", "data_offsets"])
        h[name][field] = rng.choice(FIELD_VALUES)
        yield h, None
    yield None, b"[" * 100_000 + b"]" * 100_000  # nesting deeper than the JSON parser's recursion
    yield None, json.dumps(header).replace('"shape": [', '"shape": [NaN, ', 1).encode()
    yield None, b"\xff\xfe" * 8
    for h in ({}, {**header, "__metadata__": [1]}, {**header, "__metadata__": {"a": {"b": 1}}}):
        yield h, None


def test_crafted_safetensors_headers_are_one_line(folder, tmp_path, capsys, x4_safetensors):
    header, data = split_safetensors(x4_safetensors)
    for i, (h, body) in enumerate(header_cases(header)):
        bad = crafted(tmp_path / "bad.safetensors", h, data, body)
        for extra in ([], ["--dry-run"]):
            code, stdout, err = run(capsys, folder, "-o", tmp_path / "out", "--weights", bad, "--config",
                                    WEIGHTS[3], *FAST, *extra)
            assert_one_line_error(code, stdout, err, ["bad.safetensors"], tmp_path / "out")
            assert len(err) < 600, err


SDUP_METADATA = [
    {"sdup_configs": v} for v in ("[]", "5", "not json", '{"unet": 5}', '{"unet": {"class": "Nope", "fields": {}}}',
                                  '{"unet": {"class": "UNetConfig", "fields": {"bogus": 1}}}',
                                  '{"unet": {"class": "UNetConfig", "fields": []}}', "[" * 100_000)
] + [
    {"sdup_constants": v} for v in ("[]", "{}", '{"prediction": 5}', "null")
] + [{"sdup_family": "nonsense"}, {"sdup_family": "sd1"}]


def test_tampered_sdup_metadata_is_one_line(folder, tmp_path, capsys, x4_safetensors):
    import sdup
    good = tmp_path / "x4.sdup.safetensors"
    sdup.save_sdup(sdup.load(WEIGHTS[1], config=WEIGHTS[3]), good)
    header, data = split_safetensors(good)
    for change in SDUP_METADATA:
        bad = crafted(tmp_path / "bad.sdup.safetensors", {**header, "__metadata__": {**header["__metadata__"],
                                                                                     **change}}, data)
        code, stdout, err = run(capsys, folder, "-o", tmp_path / "out", "--weights", bad, *FAST)
        assert_one_line_error(code, stdout, err, ["bad.sdup.safetensors"], tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# crafted PNG chunks before the image data: through the whole command, from a folder (whose files are also
# checked for sdup's parameters) and by name

def big_png(*args, **kw):
    """``png`` at 24 x 16 unless a size is given."""
    return png(*args, **kw) if args else png(24, 16, **kw)


CLI_PNG = {
    **{name: (make, 2) for name, make in FAILS.items() if name not in ("IHDR 0 x 0", "IHDR 100000 x 100000")},
    **{name: (make, 0) for name, make in READS.items()},
    "parameters not JSON": (lambda d: big_png(before=[chunk(b"iTXt", b"parameters\0\0\0\0\0{not json")]), 0),
    "parameters nested deep": (lambda d: big_png(before=[chunk(b"iTXt", b"parameters\0\0\0\0\0" + b"[" * 100_000)]), 0),
    "parameters a list": (lambda d: big_png(before=[chunk(b"tEXt", b"parameters\0[1, 2]")]), 0),
    "eXIf garbage": (lambda d: big_png(before=[chunk(b"eXIf", b"MM\0*garbage")]), 0),
    "pHYs short": (lambda d: big_png(before=[chunk(b"pHYs", b"\0\1")]), None),
    "gAMA zero": (lambda d: big_png(before=[chunk(b"gAMA", b"\0\0\0\0")]), None),
    "tRNS too long": (lambda d: big_png(before=[chunk(b"tRNS", b"\0" * 400)]), None),
    "sBIT zero": (lambda d: big_png(before=[chunk(b"sBIT", b"\0\0\0")]), None),
}


@pytest.mark.parametrize("case", sorted(CLI_PNG))
def test_crafted_png_chunks_through_the_command(case, tmp_path, capsys, monkeypatch):
    """One line and exit code 2 naming the file, or an output (``None``: either, never anything else)."""
    make, want = CLI_PNG[case]
    d = tmp_path / "in"
    d.mkdir()
    depth = 16 if "16-bit" in case else 8
    monkeypatch.setattr(test_images_crafted, "png", big_png)  # the cases' own 8 x 6 is below the model's minimum
    data = make(depth)
    (d / "crafted.png").write_bytes(data)
    out = tmp_path / "out"
    for spec in (d, d / "crafted.png"):
        code, stdout, err = run(capsys, spec, "-o", out, *WEIGHTS, *FAST, "--overwrite")
        assert code in ((0, 2) if want is None else (want,)), (case, code, err)
        lines = err.strip().splitlines()
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("error: ") and "crafted.png" in lines[0], err
        else:
            assert all(line.startswith("note: ") for line in lines) and (out / "crafted_x4.png").is_file(), err


# ------------------------------------------------------------------------------------------------
# late or unclear: names with newlines or odd bytes, a file-size limit, a folder at the output name


@pytest.mark.parametrize("name", ["a\nb.png", "a\rb\tc.png", "a\x1b[31mred.png", "a\u2028b.png", b"a\xffb.png"])
def test_odd_file_names_stay_one_line(tmp_path, capsys, name):
    d = tmp_path / "in"
    d.mkdir()
    path = Path(os.fsdecode(os.path.join(os.fsencode(d), os.fsencode(name))))
    Image.fromarray(rgb(16, 24, 0)).save(path, format="PNG")
    out = tmp_path / "out"
    code, stdout, err = run(capsys, d, "-o", out, *WEIGHTS, *FAST)
    assert code == 0 and len(stdout.strip().splitlines()) == 1 and stdout.startswith("wrote "), (stdout, err)
    stdout.encode("utf-8")  # printable: no lone surrogates
    assert len(list(out.iterdir())) == 1
    path.write_bytes(b"not an image")
    code, stdout, err = run(capsys, d, "-o", tmp_path / "o2", *WEIGHTS, *FAST)
    assert_one_line_error(code, stdout, err, ["not a readable image"], tmp_path / "o2")
    err.encode("utf-8")


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_a_file_size_limit_is_one_line_naming_the_output(folder, tmp_path, fmt):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "upscale.py"), str(folder / "a.png"), "-o", str(out),
                        *map(str, WEIGHTS), *FAST, "--format", fmt], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"},
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000)))
    ext = ".tif" if fmt == "tiff" else ".png"
    *notes, last = r.stderr.splitlines()  # the resume state hits the limit first: a note, the run goes on
    assert r.returncode == 2 and last == f"error: {out / ('a_x4' + ext)}: cannot write the image (File too large)"
    assert all(n.startswith("note: could not save the resume state") for n in notes), r.stderr
    assert not out.exists()


def test_a_folder_at_the_output_name_fails_before_work(folder, tmp_path, capsys, no_load):
    out = tmp_path / "out"
    (out / "a_x4.png").mkdir(parents=True)
    code, stdout, err = run(capsys, folder, "-o", out, *WEIGHTS, *FAST)
    assert_one_line_error(code, stdout, err, [f"{out / 'a_x4.png'}: cannot write the output there"], tmp_path / "x")
    assert ".partial" not in err


# ------------------------------------------------------------------------------------------------
# a hand-edited --config: wrong types, impossible or enormous sizes, schedules out of range


def edited_config(path: Path, where: tuple, value) -> Path:
    import yaml
    conf = yaml.safe_load(Path(WEIGHTS[3]).read_text())
    d = conf["model"]["params"]
    for k in where[:-1]:
        d = d[k]
    d[where[-1]] = value
    path.write_text(yaml.safe_dump(conf))
    return path


UNET = ("unet_config", "params")
EDITED_CONFIGS = [
    (UNET + ("num_res_blocks",), 10 ** 12), (UNET + ("model_channels",), 10 ** 12), (UNET + ("model_channels",), -1),
    (UNET + ("in_channels",), "x"), (UNET + ("attention_resolutions",), 5), (UNET + ("channel_mult",), [1] * 100),
    (UNET + ("num_classes",), -1), (UNET + ("transformer_depth",), None), (("scale_factor",), "x"),
    (("timesteps",), -1), (("linear_start",), [1]), (("low_scale_config", "params", "max_noise_level"), 1e308),
]


@pytest.mark.parametrize("where, value", EDITED_CONFIGS)
def test_an_edited_config_is_one_line(folder, tmp_path, capsys, where, value):
    bad = edited_config(tmp_path / "bad.yaml", where, value)
    for weights in (["--weights", WEIGHTS[1]], ["--model", "x4", "--dry-run"]):
        code, stdout, err = run(capsys, folder, "-o", tmp_path / "out", *weights, "--config", bad, *FAST)
        assert_one_line_error(code, stdout, err, [], tmp_path / "out")
    for text in ("[1, 2]", "5", "a: [", ""):
        (tmp_path / "bad.yaml").write_text(text)
        code, stdout, err = run(capsys, folder, "-o", tmp_path / "out", "--weights", WEIGHTS[1], "--config", bad, *FAST)
        assert_one_line_error(code, stdout, err, ["bad.yaml"], tmp_path / "out")
