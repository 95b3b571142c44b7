"""Loading at the size of the result: each tensor is converted as it is mapped and its source given back at once;
crafted safetensors headers fail with one line."""
import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import FIXTURES
import sdup
from sdup.checkpoints import CheckpointError
from sdup.checkpoints.io import Sources, read_state_dict

pytestmark = pytest.mark.usefixtures("no_grad")
ROOT = Path(__file__).resolve().parents[1]


def storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def test_half_precision_load_frees_each_source_as_it_is_converted(tmp_path, monkeypatch):
    """A legacy (non-zip) pickle is read whole into memory; loading it in bf16 frees each fp32 tensor once converted,
    so at every conversion the file's live tensors plus the converted ones stay within the file plus one tensor
    (converting after the whole load, as before, held the file and the whole bf16 model)."""
    sd = read_state_dict(FIXTURES / "x4" / "model.ckpt")
    torch.save({"state_dict": sd}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    read, made, peak = [], [], [0]
    real_load, real_to = torch.load, torch.Tensor.to

    def load(*args, **kwargs):
        read.append(real_load(*args, **kwargs))
        return read[-1]

    def to(t, *args, **kwargs):
        out = real_to(t, *args, **kwargs)
        if read and out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            made.append(out)
            peak[0] = max(peak[0], storage_bytes(read[0]["state_dict"].values()) + storage_bytes(made))
        return out

    monkeypatch.setattr(torch, "load", load)
    monkeypatch.setattr(torch.Tensor, "to", to)
    m = sdup.load(tmp_path / "legacy.ckpt", config=FIXTURES / "x4" / "config.yaml", dtype=torch.bfloat16)
    monkeypatch.undo()
    file_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    largest = max(t.numel() * t.element_size() for t in sd.values())
    assert made and peak[0] <= file_bytes + largest, (peak[0], file_bytes, largest)
    ref = sdup.load(FIXTURES / "x4" / "model.ckpt", config=FIXTURES / "x4" / "config.yaml")
    for comp, module in ref.components().items():  # the same tensors as converting the fp32 model
        got = getattr(m, comp).state_dict()
        assert all(torch.equal(got[k], v.to(got[k].dtype)) for k, v in module.state_dict().items()), comp


def file_rss(path: Path) -> int:
    """Bytes of ``path`` resident in this process's mappings (/proc/self/smaps)."""
    total, inside, real = 0, False, os.path.realpath(path)
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and line[0] in "0123456789abcdef":
            inside = line.rstrip().endswith(real)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_released_file_pages_leave_the_process(tmp_path, suffix):
    """Memory-mapped formats: a converted tensor's pages leave this process (the data stays in the file and reads
    back the same); tensors not registered with ``Sources`` are never touched."""
    g = torch.Generator().manual_seed(0)
    sd = {f"w{i}": torch.randn(256, 1024, generator=g) for i in range(4)}  # 1 MiB each
    path = tmp_path / f"w{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save(sd, path)
    mapped = read_state_dict(path)
    sources = Sources()
    sources.add(mapped, path)
    halves = {k: v.to(torch.bfloat16) for k, v in mapped.items()}  # reads every page
    before = file_rss(path)
    for v in mapped.values():
        sources.release(v)
    assert before >= 4 * 2**20 and file_rss(path) < 2**20, (before, file_rss(path))
    assert all(torch.equal(mapped[k], sd[k]) and torch.equal(halves[k], sd[k].bfloat16()) for k in sd)
    own = {"w": torch.ones(1000)}
    Sources().release(own["w"])
    assert own["w"].untyped_storage().nbytes() == 4000


def crafted_safetensors(path: Path, header) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
    return path


@pytest.mark.parametrize("header, message", [
    ([1, 2], "not an object"),
    ({"w": "F32"}, "no known dtype"),
    ({"w": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 16]}}, "no known dtype"),
    ({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}, "not a list of sizes"),
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, "not a list of sizes"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, "not \\[begin, end\\]"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": ["0", 16]}}, "not \\[begin, end\\]"),
    ({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}, "needs 64 bytes"),
    ({"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}}, "truncated"),
    ({"__metadata__": {"a": 1}, "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "__metadata__"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, "unreadable safetensors"),
])
def test_crafted_safetensors_headers_give_one_line_errors(tmp_path, header, message):
    path = crafted_safetensors(tmp_path / "bad.safetensors", header)
    with pytest.raises(CheckpointError, match=message) as e:
        sdup.load(path)
    assert "\n" not in str(e.value)
    det, model, error = sdup.checkpoints.loader.inspect(path)
    assert model is None and error


MEASURE = """
import resource, sys, torch, sdup
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
m = sdup.load(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
size = sum(t.numel() * t.element_size() for c in m.components().values() for t in c.state_dict().values())
print(base * 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, size)
"""


@pytest.mark.slow  # a 3.2 GiB file and up to 2.5 GiB of RAM per load; minutes
@pytest.mark.skipif(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss == 0, reason="needs ru_maxrss")
def test_full_size_x4_bf16_load_peaks_at_the_bf16_model(tmp_path_factory):
    """Full-size random x4 weights (official layout): a bf16 load's peak RSS above the imports is the loaded model
    (bf16, the VAE fp32) plus at most 0.3 GiB (the largest fp32 tensor is 0.19 GiB), for safetensors and a zip
    .ckpt; before it was the file (3.2 GiB) plus the model."""
    tmp = tmp_path_factory.mktemp("x4")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for suffix in (".safetensors", ".ckpt"):
        path = tmp / f"x4{suffix}"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "random_weights.py"), "x4", str(path)], check=True,
                       env=env, capture_output=True)
        r = subprocess.run([sys.executable, "-c", MEASURE, str(path), "bfloat16"], env=env, capture_output=True,
                           text=True, check=True)
        base, peak, size = map(int, r.stdout.split())
        assert size < 1.8 * 2**30 and peak - base <= size + 0.3 * 2**30, (suffix, base, peak, size)
        path.unlink()
