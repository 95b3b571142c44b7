"""Resumable sampling (sdup.pipelines.resume): a run stopped after any step and resumed from its saved state gives
the latents of an uninterrupted run bit for bit, for every sampler; states that do not fit are refused with a note.
The command-line runs killed with SIGKILL at several points: tests/test_resume_cli.py."""
from __future__ import annotations

import pytest
import torch

import sdup
from helpers import FIXTURES
from sdup.diffusion.samplers import SAMPLER_NAMES
from sdup.pipelines.job import run, sample
from sdup.pipelines.resume import Checkpoint, state_path
from sdup.pipelines.txt2img import prepare_txt2img

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 5
PROMPT = [254, 10, 20, 255]


@pytest.fixture(scope="module")
def model():
    return sdup.load(FIXTURES / "sd1" / "model.ckpt", config=FIXTURES / "sd1" / "config.yaml")


def job(model, sampler, seed=3, **kw):
    options = dict(height=32, width=48, steps=STEPS, guidance=3.0, batch_size=2, progress=False)
    return prepare_txt2img(model, PROMPT, sampler=sampler, seed=seed, **{**options, **kw})


class Stop(Exception):
    pass


def stop_after(k):
    def callback(info):
        if info["i"] + 1 == k:
            raise Stop
    return callback


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_resumes_bit_identical(model, sampler, tmp_path):
    """Killed after step k (here: an exception from the step's callback), saved every step; the rerun resumes at k
    with the history and the generators' states and ends on the uninterrupted latents, bit for bit."""
    with torch.inference_mode():
        ref = sample(job(model, sampler))
        for k in (1, 3):
            path = tmp_path / f"{k}.sdup-state"
            notes = []
            first = job(model, sampler, callback=stop_after(k))
            with pytest.raises(Stop):
                run(first, checkpoint=Checkpoint(path, {"w": 1}, every=1, note=notes.append))
            again = Checkpoint(path, {"w": 1}, every=1, note=notes.append, label="in.png")
            out = run(job(model, sampler), checkpoint=again)
            assert notes == [f"resumed in.png at step {k}/{STEPS}"] and again.resumed_at == k
            assert torch.equal(out.latents, ref), (sampler, k)


def test_state_saved_every_n_steps_and_at_the_end(model, tmp_path):
    path = tmp_path / "s"
    saves = []
    cp = Checkpoint(path, {}, every=2)
    real = cp.save
    cp.save = lambda state: (saves.append(state.i), real(state))
    with torch.inference_mode():
        run(job(model, "euler"), checkpoint=cp)
    assert saves == [2, 4, 5] and path.exists()
    cp.remove()
    assert not path.exists()
    never = Checkpoint(path, {}, every=0)
    with torch.inference_mode():
        run(job(model, "euler"), checkpoint=never)
    assert not path.exists()


@pytest.mark.parametrize("change", ["caller", "seed", "steps", "sampler", "prompt", "corrupt", "no_resume"])
def test_a_state_that_does_not_fit_is_not_used(model, tmp_path, change):
    """A different fingerprint (the caller's entries: weights, input; the seed = the start noise; the steps = the
    grid; the sampler; the prompt = the conditioning), an unreadable file, or --no-resume: a fresh start, with a note
    saying why (none for --no-resume), and the result of a fresh run."""
    path = tmp_path / "s"
    with torch.inference_mode():
        with pytest.raises(Stop):
            run(job(model, "dpmpp_2m", callback=stop_after(2)), checkpoint=Checkpoint(path, {"weights": "a"}, every=1))
        kw = {"seed": dict(seed=4), "steps": dict(steps=STEPS + 1), "sampler": dict(sampler="lms"),
              "prompt": dict(negative_prompt=[254, 9, 255])}.get(change, {})
        if change == "corrupt":
            path.write_bytes(path.read_bytes()[:100])
        notes = []
        cp = Checkpoint(path, {"weights": "b" if change == "caller" else "a"}, every=1, note=notes.append,
                        resume=change != "no_resume")
        fresh = {**dict(sampler="dpmpp_2m"), **kw}
        out = run(job(model, **fresh), checkpoint=cp)
        ref = sample(job(model, **fresh))
    assert cp.resumed_at is None and torch.equal(out.latents, ref)
    why = {"caller": "the weights changed", "seed": "the start noise changed", "steps": "the grid changed",
           "sampler": "the sampler changed", "prompt": "the conditioning changed", "corrupt": "not readable"}
    if change == "no_resume":
        assert notes == []
    else:
        assert len(notes) == 1 and why[change] in notes[0] and notes[0].endswith("starting over"), notes


def test_state_path_is_hidden_next_to_the_output(tmp_path):
    assert state_path(tmp_path / "out" / "a_x4.png") == tmp_path / "out" / ".a_x4.png.sdup-state"


def test_remove_abandoned_keeps_the_files_of_living_writers(tmp_path):
    """The temporary files of a path whose process is gone (a SIGKILL during atomic_write) are removed; a living
    writer's (here: this process's) and other paths' are kept."""
    import os
    import subprocess
    import sys
    from sdup.fileio import remove_abandoned
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f".o[1].png.{gone.stdout.strip()}-abc.partial"
    alive = tmp_path / f".o[1].png.{os.getpid()}-def.partial"
    other = tmp_path / f".p.png.{gone.stdout.strip()}-abc.partial"
    for p in (dead, alive, other):
        p.write_bytes(b"x")
    remove_abandoned(tmp_path / "o[1].png")
    assert not dead.exists() and alive.exists() and other.exists()


@pytest.mark.parametrize("tamper", ["fingerprint", "step", "x", "history", "generators", "format"])
def test_a_tampered_state_is_refused_in_one_note(model, tmp_path, tamper):
    """A state file whose fields have the wrong types or shapes (the fingerprint intact) is refused with a note, never
    a traceback, and the run starts over."""
    path = tmp_path / "s"
    with torch.inference_mode():
        with pytest.raises(Stop):
            run(job(model, "plms", callback=stop_after(2)), checkpoint=Checkpoint(path, {}, every=1))
    saved = torch.load(path, weights_only=True)
    saved[tamper] = {"fingerprint": "x", "step": 99, "x": torch.zeros(1), "history": [torch.zeros(2, 2)],
                     "generators": [torch.zeros(3, dtype=torch.uint8)] * 2, "format": "other"}[tamper]
    torch.save(saved, path)
    notes = []
    with torch.inference_mode():
        out = run(job(model, "plms"), checkpoint=Checkpoint(path, {}, every=1, note=notes.append))
        assert torch.equal(out.latents, sample(job(model, "plms")))
    assert len(notes) == 1 and "starting over" in notes[0], notes


def test_a_resume_at_another_thread_count_says_so(model, tmp_path):
    path = tmp_path / "s"
    with torch.inference_mode():
        with pytest.raises(Stop):
            run(job(model, "euler", callback=stop_after(2)), checkpoint=Checkpoint(path, {}, every=1))
        saved = torch.load(path, weights_only=True)
        assert saved["threads"] == torch.get_num_threads()
        torch.save({**saved, "threads": 99}, path)
        notes = []
        run(job(model, "euler"), checkpoint=Checkpoint(path, {}, every=1, note=notes.append, label="a.png"))
    assert notes == [f"resumed a.png at step 2/{STEPS} (saved at 99 threads, now {torch.get_num_threads()}: the last "
                     "bits may differ from an uninterrupted run)"]
