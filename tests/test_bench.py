"""scripts/bench.py end to end on a tiny UNet, so the script cannot silently break: build both implementations from
the same weights, check they agree, time them interleaved, count FLOPs (sdup.nn.Conv2d's small-map path included)
and write the markdown table. No timing is asserted: only that every column is filled in and the outputs agree."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from helpers import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tiny = json.loads((FIXTURES / "sd1" / "diffusers" / "unet" / "config.json").read_text())
    tiny = {k: v for k, v in tiny.items() if not k.startswith("_")}
    monkeypatch.setitem(module.CASES, "tiny-unet",
                        ("tiny SD UNet, 8x12 latent, batch 2", lambda d: module.unet_case(tiny, 8, 12, dtype=d), False))
    real_ceiling = module.matmul_ceiling
    monkeypatch.setattr(module, "matmul_ceiling", lambda dtype: real_ceiling(dtype, n=256, runs=1))
    saved = torch.get_num_threads()
    yield module
    torch.set_num_threads(saved)


def table(path: Path) -> dict:
    """The markdown table's one data row, as {column: cell}."""
    rows = [line for line in path.read_text().splitlines() if line.startswith("|")]
    head, row = rows[0], rows[2]
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    return dict(zip(cells(head), cells(row)))


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("bf16", 0.1)])
def test_bench_runs_to_its_table(bench, tmp_path, dtype, tol):
    out = tmp_path / "bench.md"
    assert bench.main(["--models", "tiny-unet", "--runs", "2", "--threads", "1", "--dtype", dtype,
                       "--markdown", str(out)]) == 0
    row = table(out)
    assert row["model"].startswith("tiny SD UNet")
    for col in ("sdup s", "diffusers s", "sdup/diffusers", "sdup GFLOP/s"):
        assert float(row[col]) > 0, (col, row)
    assert row["of ceiling"].endswith("%")
    assert float(row["max abs diff"]) <= tol, row  # the two implementations computed the same thing
    if dtype == "bf16":
        assert float(row["sdup fp32 s"]) > 0 and float(row["fp32/bf16"]) > 0


def test_flops_count_the_small_map_conv_path(bench):
    """sdup.nn.Conv2d runs aten._slow_conv2d_forward on small fp32 maps; FlopCounterMode must count it like a
    convolution (2 * output positions * C_out * C_in * kernel area) instead of raising."""
    from sdup.nn.layers import Conv2d
    conv = Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 8, 8)
    expected = 2 * (2 * 8 * 8) * 16 * 8 * 9
    assert bench.flops(lambda: conv(x)) == expected
    assert bench.flops(lambda: torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)) == expected


@pytest.mark.parametrize("argv,message", [
    (["--dtype", "fp16"], "--dtype fp16 only with --device cuda"),
    (["--device", "cuda", "--memory"], "not with --device cuda"),
    (["--device", "cuda", "--ablation"], "not with --device cuda"),
    (["--device", "gpu"], "invalid choice"),
])
def test_bench_refuses_options_cleanly(bench, capsys, argv, message):
    """Options that do not apply end in one argparse error line (exit 2), before any model is built."""
    with pytest.raises(SystemExit) as e:
        bench.main(["--models", "tiny-unet", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bench_cuda_without_a_gpu_is_one_line(bench, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        bench.main(["--models", "tiny-unet", "--device", "cuda"])
    assert e.value.code == 2 and "torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_bench_cuda_table_on_cpu_tensors(bench, tmp_path, monkeypatch, dtype):
    """The --device cuda bookkeeping (columns, triton column, relative agreement check) with the tensors left on the
    CPU: no GPU here, so the device, the ceilings and the CUDA calls are stand-ins; only the table is checked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in GPU")
    monkeypatch.setattr(bench, "device", lambda: torch.device("cpu"))
    monkeypatch.setattr(bench, "cuda_ceilings", lambda: {name: 1.0 for name in bench.DTYPES})
    import importlib
    monkeypatch.setitem(importlib.import_module("sdup.nn.attention")._state, "triton_failed", True)  # CPU: sdpa
    out = tmp_path / "bench.md"
    assert bench.main(["--models", "tiny-unet", "--runs", "1", "--device", "cuda", "--dtype", dtype,
                       "--markdown", str(out)]) == 0
    row = table(out)
    for col in ("sdup s", "diffusers s", "sdup triton s", "sdup/diffusers", "sdup GFLOP/s"):
        assert float(row[col]) > 0, (col, row)
    assert "rel)" in row["max abs diff"] and "MISMATCH" not in row["max abs diff"], row
    if dtype == "fp16":
        assert float(row["sdup fp32 s"]) > 0 and float(row["fp32/fp16"]) > 0
    assert "stand-in GPU" in out.read_text()
