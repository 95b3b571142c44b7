"""The web page's parts without a browser (sdup.web): the form from the CLI's parser and the Upscaler records, staged
uploads, the plan, the one-job queue with cancel, and the run's PNG against the CLI's (the same pixels); on the tiny
random-weight x4 checkpoint.  The page itself in a real browser: test_web_browser.py."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio", reason="the web extra: pip install -e '.[web]'")

from helpers import FIXTURES  # noqa: E402
from sdup import cli  # noqa: E402
from sdup.cli.arguments import UsageError  # noqa: E402
from sdup.images import UpscaleIOError, read_image, read_parameters  # noqa: E402
from sdup.pipelines.registry import UPSCALERS  # noqa: E402
from sdup.web.form import allowed_extensions, fields, form_argv, stage_uploads  # noqa: E402
from sdup.web.jobs import CANCELLED, DONE, FAILED, JobQueue, Ticket  # noqa: E402
from sdup.web.runner import Request, Runner, ServerOptions  # noqa: E402

X4 = FIXTURES / "x4"
pytestmark = pytest.mark.usefixtures("one_thread")


def save(path: Path, h: int, w: int, seed: int = 0) -> Path:
    Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    work = tmp_path_factory.mktemp("web")
    return Runner(ServerOptions(str(X4 / "model.ckpt"), str(X4 / "config.yaml"), workdir=work, max_pixels=20_000))


def request(runner, tmp_path, files, form) -> Request:
    up = stage_uploads([str(f) for f in files], tmp_path / "staged", allowed_extensions(runner.upscaler), 2**20)
    return Request(up, form, tmp_path / "job")


def wait(ticket, seconds=60.0):
    end = time.time() + seconds
    while not ticket.finished and time.time() < end:
        time.sleep(0.02)
    assert ticket.finished, ticket


def test_form_offers_what_the_table_offers():
    dests = {name: [f.dest for f in fields(u)] for name, u in UPSCALERS.items()}
    assert "noise_level" in dests["x4"] and "dec_w" not in dests["x4"]
    assert "schedule" in dests["x2"] and "noise_level" in dests["x2"]
    assert {"dec_w", "scale", "input_size", "start"} <= set(dests["stablesr"]) and "noise_level" not in dests["stablesr"]
    fs = fields(UPSCALERS["x4"])
    values = {"steps": "3", "sampler": "default", "guidance": "", "seed": "7", "dtype": "fp32", "noise_level": 5}
    argv = form_argv(fs, [values.get(f.dest) for f in fs], ("254,7,255", "token ids"), ("", "text"))
    assert argv == ["--prompt-ids", "254,7,255", "--steps", "3", "--seed", "7", "--noise-level", "5"]
    assert ".safetensors" in allowed_extensions(UPSCALERS["x2"]) and ".safetensors" not in allowed_extensions(
        UPSCALERS["x4"])


def test_upload_names_never_become_paths(tmp_path):
    src = tmp_path / "up"
    (src / "sub").mkdir(parents=True)
    a = save(src / "..%2f..%2fevil name.png", 8, 8)
    staged = stage_uploads([str(a)], tmp_path / "staged", allowed_extensions(UPSCALERS["x4"]), 2**20)
    assert staged[0].path == tmp_path / "staged" / "image-1.png" and staged[0].name == a.name
    (src / "notes.txt").write_text("x")
    with pytest.raises(UpscaleIOError, match=r"notes.txt: not a supported file"):
        stage_uploads([str(src / "notes.txt")], tmp_path / "s2", allowed_extensions(UPSCALERS["x4"]), 2**20)
    with pytest.raises(UpscaleIOError, match=r"above the upload limit"):
        stage_uploads([str(a)], tmp_path / "s3", allowed_extensions(UPSCALERS["x4"]), 10)


def test_plan_is_the_dry_run_and_bad_options_are_the_cli_line(runner, tmp_path):
    a = save(tmp_path / "cat.png", 16, 24)
    lines = runner.plan(request(runner, tmp_path, [a], ["--steps", "2"]))
    assert lines[0].startswith("cat.png (24x16) -> image-1_x4.png (96x64): latent tiles 1, VAE tiles 1")
    assert "estimated peak memory" in lines[0] and "steps 2" in lines[1]
    for form, msg in ((["--noise-level", "999"], "--noise-level must be an integer in 0..350"),
                      (["--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
                      (["--tile", "3"], "--tile must be 0 (off) or >= 8")):
        with pytest.raises(UsageError) as e:
            runner.plan(request(runner, tmp_path, [a], form))
        assert msg in e.value.message and "\n" not in e.value.message
    huge = save(tmp_path / "huge.png", 200, 200)
    with pytest.raises(UsageError) as e:
        runner.plan(request(runner, tmp_path, [huge], []))
    assert "200x200" in e.value.message and "above the limit" in e.value.message


def test_the_page_writes_the_cli_pixels(runner, tmp_path, capsys):
    """A job of the page and ``python -m sdup upscale`` with the same settings: the same pixels."""
    a = save(tmp_path / "cat.png", 16, 24)
    ticket = Ticket("tab", request(runner, tmp_path, [a], ["--steps", "2", "--seed", "1"]))
    queue = JobQueue(runner.run)
    queue.submit(ticket)
    wait(ticket)
    assert ticket.state == DONE, ticket.message
    out = ticket.outputs[0]
    assert out.name == "cat.png" and out.path.suffix == ".png" and out.parameters["steps"] == 2
    code = cli.main(["upscale", str(a), "-o", str(tmp_path / "cli.png"), "--weights", str(X4 / "model.ckpt"),
                     "--config", str(X4 / "config.yaml"), "--steps", "2", "--seed", "1", "--quiet"])
    assert code == 0, capsys.readouterr().err
    page, ref = read_image(out.path), read_image(tmp_path / "cli.png")
    assert torch.equal(page.rgb, ref.rgb) and page.bits == ref.bits == 8
    assert np.array_equal(np.asarray(Image.open(out.path)), np.asarray(Image.open(tmp_path / "cli.png")))
    assert read_parameters(out.path)["seed"] == 1


def test_queue_positions_cancel_and_one_line_failures(runner, tmp_path):
    gate = threading.Event()

    def work(ticket):
        if ticket.request == "slow":
            while not gate.is_set():
                ticket.progress.on_step({"i": 0})  # where a run looks for cancel
                time.sleep(0.01)
        if ticket.request == "bug":
            raise KeyError("deep inside")
        if ticket.request == "user":
            raise UsageError("--steps must be >= 1, got 0")
        return ["ok"]

    queue = JobQueue(work)
    slow, b, c = (queue.submit(Ticket(s, r)) for s, r in (("A", "slow"), ("B", "fast"), ("C", "fast")))
    while queue.position(slow) != 0:
        time.sleep(0.01)
    assert (queue.position(b), queue.position(c), queue.length) == (1, 2, 3)
    assert queue.cancel("C") == 1 and c.state == CANCELLED and queue.position(b) == 1
    queue.cancel("A")
    wait(slow), wait(b)
    assert slow.state == CANCELLED and b.state == DONE and b.outputs == ["ok"]
    bug, user = queue.submit(Ticket("D", "bug")), queue.submit(Ticket("D", "user"))
    wait(bug), wait(user)
    assert bug.state == FAILED and bug.message.startswith("internal error (KeyError") and "\n" not in bug.message
    assert user.state == FAILED and user.message == "--steps must be >= 1, got 0"


def test_cancel_stops_at_the_next_step_and_writes_nothing(runner, tmp_path):
    a = save(tmp_path / "cat.png", 16, 24)
    job = request(runner, tmp_path, [a], ["--steps", "200", "--seed", "1"])
    ticket = Ticket("tab", job)
    queue = JobQueue(runner.run)
    queue.submit(ticket)
    while ticket.progress.step < 2 and not ticket.finished:
        time.sleep(0.01)
    queue.cancel("tab")
    wait(ticket)
    assert ticket.state == CANCELLED and ticket.progress.step < 200
    assert not (job.folder / "out").exists() and not list(job.folder.rglob("*.partial"))


def test_text_prompt_on_the_tiny_encoder_is_the_cli_line(runner, tmp_path):
    a = save(tmp_path / "cat.png", 16, 24)
    form = form_argv(fields(runner.upscaler), [None] * len(fields(runner.upscaler)), ("a cat", "text"), ("", "text"))
    ticket = Ticket("tab", request(runner, tmp_path, [a], [*form, "--steps", "2"]))
    queue = JobQueue(runner.run)
    queue.submit(ticket)
    wait(ticket)
    assert ticket.state == FAILED and ticket.message == ("this text encoder (vocabulary 256) has no BPE tokenizer: give "
                                                         "the prompt as token ids")


def test_compare_reference_and_zoomed_pair(tmp_path):
    from sdup.web.compare import crop_box, reference, zoomed_pair
    a = save(tmp_path / "a.png", 16, 24)
    near = reference(a, (64, 96), "nearest")
    assert near.size == (96, 64) and near.getpixel((5, 5)) == Image.open(a).convert("RGB").getpixel((1, 1))
    assert reference(a, (64, 96), "bicubic").size == (96, 64)
    with pytest.raises(ValueError, match="reference must be one of"):
        reference(a, (64, 96), "lanczos")
    assert crop_box((96, 64), (1.0, 0.0), 4) == (72, 0, 96, 16)  # kept inside the image
    pair = zoomed_pair(near, near, (0.5, 0.5), 4)
    assert pair.height == 16 * 14 and pair.width == 2 * 24 * 14 + 4  # 24x16 box, enlarged 14x to >= 320 px wide


def test_x2_latents_and_images_on_the_page(tmp_path):
    """The x2 page takes latents files too; each sample is a result, compared against the output taken down and
    back up (a latents file has no input image)."""
    from safetensors.torch import save_file
    from sdup.web.handlers import Page
    x2 = Runner(ServerOptions(str(FIXTURES / "latent_upscaler" / "diffusers"), vae=str(FIXTURES / "sd1" / "diffusers"
                                                                                       / "vae"), workdir=tmp_path / "w"))
    assert x2.upscaler.name == "x2"
    save_file({"latents": torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))},
              str(tmp_path / "lat.safetensors"), metadata={"scale_factor": "0.18215"})
    a = save(tmp_path / "a.png", 64, 72)
    ticket = Ticket("tab", request(x2, tmp_path, [tmp_path / "lat.safetensors", a], ["--steps", "2"]))
    queue = JobQueue(x2.run)
    queue.submit(ticket)
    wait(ticket)
    assert ticket.state == DONE, ticket.message
    assert [o.name for o in ticket.outputs] == ["lat.safetensors[0]", "lat.safetensors[1]", "a.png"]
    page = Page(x2, queue)
    (before, after), pair, params, files = page.show(ticket.outputs, "2: lat.safetensors[1]", "nearest", 0.5, 0.5, 2)
    assert before.size == after.size == (192, 128) and params["input_index"] == 1 and len(files) == 3
    (before, after), _, _, _ = page.show(ticket.outputs, "3: a.png", "bicubic", 0, 1, 8)
    assert before.size == after.size == (144, 128)


def test_serve_checks_before_serving(tmp_path, capsys):
    """Bad weights or a bad port: the CLI's one line and exit code 2, before Gradio starts; another address than
    this machine's: a warning line."""
    from sdup.web.serve import build_parser, check
    for argv, msg in (([str(tmp_path / "none.ckpt")], "none.ckpt: no such file or folder"),
                      ([str(X4 / "model.ckpt"), "--config", str(X4 / "config.yaml"), "--port", "0"],
                       "--port must be in 1..65535")):
        with pytest.raises(SystemExit) as e:
            cli.main(["serve", "--weights", *argv, "--workdir", str(tmp_path / "w")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0], err
    assert not (tmp_path / "w").exists()
    check(build_parser().parse_args(["--weights", "x"]))
    assert capsys.readouterr().err == ""
    check(build_parser().parse_args(["--weights", "x", "--host", "0.0.0.0"]))
    assert capsys.readouterr().err.startswith("warning: serving on 0.0.0.0:7860: anyone who can reach this machine")


def test_page_lines_for_bugs_and_progress(runner, tmp_path, monkeypatch, capsys):
    """A bug in the plan reaches the page as one line (its traceback in the server's log); the progress line says
    starting, steps and tiles, decoding."""
    from sdup.web.handlers import Page, progress_html
    page = Page(runner, JobQueue(runner.run))
    up = stage_uploads([str(save(tmp_path / "a.png", 16, 16))], tmp_path / "s", allowed_extensions(runner.upscaler), 2**20)

    def broken(request):
        raise KeyError("deep inside")
    monkeypatch.setattr(runner, "plan", broken)
    line = page.plan(up, "", "text", "", "text", *[None] * len(page.fields))
    assert 'data-state="error">error: internal error (KeyError' in line and "Traceback" not in line
    assert "Traceback" in capsys.readouterr().err
    t = Ticket("tab", None)
    assert "starting" in progress_html(t)
    t.progress.start_image(0, 2, 10, 4)
    t.progress.on_step({"i": 2}), t.progress.on_call(), t.progress.on_call()
    assert "image 1 of 2 · step 3 of 10 · tile 2 of 4" in progress_html(t) and 'value="0.150"' in progress_html(t)
    t.progress.on_step({"i": 9})
    assert "decoding" in progress_html(t)


def test_old_job_folders_are_pruned(tmp_path):
    import os
    from sdup.web.runner import prune
    old, new, other = tmp_path / ("a" * 32), tmp_path / ("b" * 32), tmp_path / "uploads"
    for d in (old, new, other):
        d.mkdir()
    os.utime(old, (0, 0))
    os.utime(other, (0, 0))
    assert prune(tmp_path, keep_s=3600) == 1 and not old.exists() and new.exists() and other.exists()
