"""scripts/explore.py, the worked example of docs/research.md, on the tiny x4 weights: it writes its pictures with the
sizes its layout gives, the attention maps average probabilities (each position's map over the text sums to 1), and
the recorded steps and noise levels are the requested ones."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def explore_module():
    spec = importlib.util.spec_from_file_location("explore", ROOT / "scripts" / "explore.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_explore_writes_its_pictures(tmp_path):
    ex = explore_module()
    h, w, cell = 10, 12, 40  # not a multiple of the UNet's 2: padded, then cropped
    Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype(np.uint8)).save(tmp_path / "low.png")
    out = tmp_path / "out"
    args = ["--weights", FIXTURES / "x4" / "model.ckpt", "--config", FIXTURES / "x4" / "config.yaml",
            "--image", tmp_path / "low.png", "--prompt-ids", "254,7,9,255", "-o", out, "--steps", 3,
            "--noise-levels", "0,350", "--x0-steps", "0,2", "--cell", cell, "--cols", 2, "--device", "cpu"]
    summary = ex.main([str(a) for a in args])
    size = ex.cell_size(h, w, cell)
    assert size == (40, 33)
    sizes = {p.name: Image.open(p).size for p in out.glob("*.png")}
    assert sizes["attention.png"] == ex.grid_size(3, 2, size)  # the input + 2 prompt tokens, 2 per row
    assert sizes["x0_steps.png"] == ex.grid_size(2, 2, size)
    width, height = ex.grid_size(4, 2, size)                    # 2 outputs over 2 difference maps, then the plot
    assert sizes["noise_levels.png"] == (width, height + ex.PLOT_H)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["x0_steps"] == [0, 2] and summary["noise_levels"] == [0, 350] and len(summary["layers"]) > 1
    maps = load_file(out / "attention_maps.safetensors")
    assert maps["maps"].shape == (77, h, w) and maps["token_ids"].tolist() == [254, 7, 9, 255]
    torch.testing.assert_close(maps["maps"].sum(0), torch.ones(h, w))  # probabilities, averaged


def test_prompt_tokens_label_the_bpe_pieces():
    """With the CLIP tokenizer of the real weights each map is labelled with its BPE piece."""
    ex = explore_module()
    from types import SimpleNamespace

    from sdup.models.text import Tokenizer
    model = SimpleNamespace(tokenizer=Tokenizer(pad_token_id=0))
    ids, labels = ex.prompt_tokens(model, SimpleNamespace(prompt_ids=None, prompt="a sharp photo"))
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 5
    assert labels[1:-1] == ["a", "sharp", "photo"]
    assert ex.prompt_tokens(model, SimpleNamespace(prompt_ids="49406,320,49407", prompt="x"))[0] == [49406, 320, 49407]
    no_bpe = SimpleNamespace(tokenizer=None)
    assert ex.prompt_tokens(no_bpe, SimpleNamespace(prompt_ids="254,7,255", prompt=""))[1] == ["#254", "#7", "#255"]
