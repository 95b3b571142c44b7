"""The holes an adversarial pass found in the upscale command (issue 22, item 5), one class per section: each bad
input ends in one line and exit code 2 before any expensive work, or in a correct output; no user file is
overwritten or lost. Tiny x4 / StableSR fixtures, two steps."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sdup.cli import running
from sdup.diffusion.samplers import get_sampler
from sdup.pipelines.job import Job, NonFiniteResult, finish
from test_upscale_cli import FAST, SR_FAST, SR_WEIGHTS, WEIGHTS, assert_one_line_error, rgb, run

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
    def refuse(*_):
        raise AssertionError("the weights were loaded before the check")
    monkeypatch.setattr(running, "load", refuse)


# ------------------------------------------------------------------------------------------------
# silently wrong output: a value the option cannot mean is refused, never replaced by the default

BAD_VALUES = [
    (WEIGHTS, "--steps", v, "--steps must") for v in ("0", "-1")
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
