"""``python -m sdup serve`` in a real headless browser (Debian's chromium + chromium-driver, driven by Selenium), on
the tiny random-weight x4 checkpoint: load, upload, change options, run, output, download (the CLI's pixels),
the one-line messages of bad inputs with the server still serving, the queue across two tabs, and cancel.

Without chromium the tests are skipped, except under CI (``CI`` set), where that is a failure: ``.ci/run``
installs it.  ``SDUP_WEB_SCREENSHOT=docs/web.png`` saves the page with a result there (the README's picture).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import FIXTURES
from sdup import cli
from sdup.images import read_image, read_parameters

X4 = FIXTURES / "x4"
WEIGHTS = ["--weights", str(X4 / "model.ckpt"), "--config", str(X4 / "config.yaml")]
MAX_PIXELS = 20_000  # the server's upload limit in pixels: a 200x200 image is "huge"
WAIT_S = 60


def need(what: str):
    """A missing browser: a failure under CI (it must run there), else a skip."""
    msg = f"{what} (apt-get install chromium chromium-driver; pip install -e '.[test]')"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


try:
    import gradio  # noqa: F401
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as e:  # pragma: no cover - the test extra installs them
    need(f"the web test packages are missing ({e})")


def save(path: Path, h: int, w: int, seed: int = 0) -> Path:
    Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)).save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    port, log = free_port(), work / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "sdup", "serve", *WEIGHTS, "--port", str(port), "--workdir",
                                 str(work / "jobs"), "--max-pixels", str(MAX_PIXELS)], stdout=fh, stderr=subprocess.STDOUT,
                                env=env)
    url = f"http://127.0.0.1:{port}/"
    end = time.time() + WAIT_S
    while time.time() < end:
        assert proc.poll() is None, log.read_text()
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        pytest.fail(f"the server did not answer in {WAIT_S} s: {log.read_text()}")
    yield url, work / "jobs", log
    proc.terminate()
    proc.wait(20)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_bin:
        need("no chromium / chromedriver on PATH")
    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        opts.add_argument(arg)
    opts.binary_location = chromium
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    d = webdriver.Chrome(service=webdriver.ChromeService(driver_bin), options=opts)
    yield d, downloads
    d.quit()


# ------------------------------------------------------------------------------------------------
# the page, as a user drives it


def open_page(d, url):
    d.get(url)
    WebDriverWait(d, WAIT_S).until(lambda d: d.find_elements(By.ID, "sdup-run"))


def upload(d, *paths):
    """Upload, and wait for the plan (or the message) of the upload."""
    d.find_element(By.CSS_SELECTOR, "#sdup-files input[type=file]").send_keys("\n".join(map(str, paths)))
    WebDriverWait(d, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sdup-plan [data-state=plan], "
                                                                              "#sdup-plan [data-state=error]"))


def set_option(d, dest: str, value: str):
    """Type into an option's field (``prompt``: the prompt's)."""
    eid = "sdup-prompt" if dest == "prompt" else f"sdup-opt-{dest.replace('_', '-')}"
    box = d.find_element(By.CSS_SELECTOR, f"#{eid} :is(input, textarea)")
    box.clear()
    box.send_keys(value)


def start_job(d, url, path, plan_shows: tuple = (), **options):
    """A fresh page: upload ``path``, set ``options`` (dest=value), wait for the plan to show ``plan_shows``, run."""
    open_page(d, url)
    upload(d, path)
    for dest, value in options.items():
        set_option(d, dest, value)
    wait_text(d, "sdup-plan", *plan_shows)
    d.find_element(By.ID, "sdup-run").click()


def text(d, eid: str) -> str:
    return d.find_element(By.ID, eid).text


def wait_text(d, eid: str, *wanted: str, timeout=WAIT_S) -> str:
    WebDriverWait(d, timeout).until(lambda d: all(w in text(d, eid) for w in wanted),
                                    f"#{eid} never showed {wanted}")
    return text(d, eid)


def state(d) -> str | None:
    found = d.find_elements(By.CSS_SELECTOR, "#sdup-status [data-state]")
    return found[0].get_attribute("data-state") if found else None


def wait_state(d, *states, timeout=WAIT_S) -> str:
    WebDriverWait(d, timeout).until(lambda d: state(d) in states, f"the status never became {states}")
    return text(d, "sdup-status")


def assert_one_line_error(d, *wanted: str):
    line = wait_state(d, "error")
    assert line.startswith("error: ") and "\n" not in line.strip(), line
    for w in wanted:
        assert w in line, (w, line)
    assert "Traceback" not in d.page_source


# ------------------------------------------------------------------------------------------------


def test_upload_run_compare_download(server, browser, tmp_path, capsys):
    """Load, upload, change options, see the plan, run, see the before/after, the crops and the parameters,
    download: the PNG holds the CLI's pixels for the same settings."""
    url, _, _ = server
    d, downloads = browser
    a = save(tmp_path / "cat photo.png", 16, 24)
    start_job(d, url, a, ("cat photo.png (24x16) -> image-1_x4.png (96x64)", "steps 2", "peak memory"), steps="2",
              seed="1")
    assert wait_state(d, "done").startswith("done: 1 image")
    WebDriverWait(d, WAIT_S).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sdup-compare img")) >= 2)
    assert d.find_elements(By.CSS_SELECTOR, "#sdup-crops img")
    params = d.find_element(By.ID, "sdup-params").get_attribute("textContent")  # all of it, scrolled or not
    assert '"steps": 2' in params and '"seed": 1' in params and '"pipeline": "x4"' in params
    link = WebDriverWait(d, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sdup-download a[href]"))
    fetched = d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert fetched and not [u for u in fetched if not u.startswith(url)], "the page fetched from outside"
    if os.environ.get("SDUP_WEB_SCREENSHOT"):  # the whole page, status line included
        d.set_window_size(1400, 1800)
        time.sleep(1)
        d.save_screenshot(os.environ["SDUP_WEB_SCREENSHOT"])
    link[0].click()
    end = time.time() + WAIT_S
    while not (got := [p for p in downloads.glob("*.png")]) and time.time() < end:
        time.sleep(0.2)
    assert got, "nothing downloaded"
    code = cli.main(["upscale", str(a), "-o", str(tmp_path / "cli.png"), *WEIGHTS, "--steps", "2", "--seed", "1",
                     "--quiet"])
    assert code == 0, capsys.readouterr().err
    page, ref = read_image(got[0]), read_image(tmp_path / "cli.png")
    assert torch.equal(page.rgb, ref.rgb) and page.size == (64, 96)
    recorded = read_parameters(got[0])  # the PNG carries its parameters
    assert recorded["steps"] == 2 and recorded["seed"] == 1 and recorded["pipeline"] == "x4"


def test_bad_inputs_show_the_cli_line_and_the_server_keeps_serving(server, browser, tmp_path):
    url, _, _ = server
    d, _ = browser
    cases = [(save(tmp_path / "tiny.png", 4, 4), {}, ("tiny.png: 4x4 is smaller than the x4 model's minimum 8x8",)),
             (save(tmp_path / "huge.png", 200, 200), {}, ("huge.png: 200x200", "above the limit")),
             (tmp_path / "broken.png", {}, ("broken.png",)),
             (save(tmp_path / "ok.png", 16, 16), {"noise_level": "999"}, ("--noise-level must be an integer in 0..350",)),
             (tmp_path / "ok.png", {"steps": "abc"}, ("argument --steps: invalid int value: 'abc'",))]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    for path, options, wanted in cases:
        start_job(d, url, path, ("error: ",), **options)
        assert_one_line_error(d, *wanted)
        assert str(tmp_path) not in text(d, "sdup-status")  # messages name the upload, not a server path
    # a text prompt on the tiny encoder fails in the run, with the CLI's line
    start_job(d, url, tmp_path / "ok.png", ("steps 2",), steps="2", prompt="a cat")
    assert_one_line_error(d, "has no BPE tokenizer: give the prompt as token ids")
    start_job(d, url, tmp_path / "ok.png", ("steps 2",), steps="2")  # and the server still serves
    assert wait_state(d, "done").startswith("done")


def test_queue_across_tabs_progress_and_cancel(server, browser, tmp_path):
    """A long job in tab A shows steps and tiles; tab B's job waits with its position; Cancel in A stops A at its
    next step with nothing written, and B runs; closing a tab with a running job ends that job."""
    url, jobs, _ = server
    d, _ = browser
    big, small = save(tmp_path / "big.png", 64, 64), save(tmp_path / "small.png", 16, 16)
    before = set(jobs.glob("*/out/*"))  # the other tests' outputs
    tab_a = d.current_window_handle
    start_job(d, url, big, ("latent tiles 25", "steps 500"), steps="500", tile="16")
    wait_state(d, "running")
    WebDriverWait(d, WAIT_S).until(lambda d: re.search(r"image 1 of 1 · step [1-9]\d* of 500 · tile \d+ of 25",
                                                       text(d, "sdup-status")), "no steps and tiles shown")
    WebDriverWait(d, WAIT_S).until(lambda d: float(d.find_element(By.ID, "sdup-progress").get_attribute("value")) > 0)
    d.switch_to.new_window("tab")
    start_job(d, url, small, ("steps 2",), steps="2")
    assert "queued: position 1 of 2" in wait_state(d, "queued")
    d.switch_to.window(tab_a)
    d.find_element(By.ID, "sdup-cancel").click()
    assert "cancelled" in wait_state(d, "cancelled")
    d.switch_to.window([h for h in d.window_handles if h != tab_a][0])
    assert wait_state(d, "done").startswith("done: 1 image")
    written = set(jobs.glob("*/out/*")) - before
    assert [p.name for p in written] == ["image-1_x4.png"], written  # B's output only
    assert not list(jobs.rglob("*.partial"))
    start_job(d, url, big, ("steps 500",), steps="500", tile="16")  # a tab closed: its job goes too
    wait_state(d, "running")
    d.close()
    d.switch_to.window(tab_a)
    start_job(d, url, small, ("steps 2",), steps="2")
    assert wait_state(d, "done", timeout=30).startswith("done: 1 image")  # not after the 500 steps
