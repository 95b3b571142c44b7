"""The fused Triton attention kernel (sdup.nn.triton_attention), checked on the CPU with Triton's interpreter
(TRITON_INTERPRET=1 must be set before triton is imported, so those checks run in a subprocess), and the backend
selection / fallback of sdup.nn.attention. The sdpa / math / chunked backends are parity-tested on the upstream
fixtures in test_unet_vae.py and test_stablesr_models.py."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import FIXTURES, assert_parity
A = importlib.import_module("sdup.nn.attention")  # the module (sdup.nn.attention is also the function's name)

ROOT = Path(__file__).resolve().parents[1]


def interpreted(code: str, timeout: int = 300) -> str:
    """Run ``code`` in a fresh interpreter with TRITON_INTERPRET=1 (one thread); returns stdout."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_triton_kernel_matches_math_backend():
    """Non-power-of-two token counts and head dims (40, 80, 160 are padded to 64 / 128 / 256 with masks),
    cross-attention with 77 keys, batch 2 x 2 heads, blocks smaller than the sequence (several key blocks, a partial last block).
    fp32 within 1e-5 relative; fp16 within 2e-3 (fp16 inputs, fp32 accumulation). bf16 is not checked here: the
    interpreter's bf16 ``tl.dot`` is wrong even for a plain 16x16 product (a Triton interpreter limitation)."""
    out = interpreted("""
        import torch
        from sdup.nn.attention import attention_math
        from sdup.nn.triton_attention import triton_attention
        g = torch.Generator().manual_seed(0)
        for (b, h, nq, nk, d, bm, bn) in [(2, 2, 37, 37, 40, 16, 16), (1, 2, 64, 64, 64, 32, 16),
                                          (2, 2, 20, 77, 80, 16, 32), (1, 1, 5, 3, 8, 16, 16),
                                          (1, 1, 40, 77, 160, None, None)]:  # SD 1.x's widest head, its blocks
            q, k, v = (torch.randn(b, h, n, d, generator=g) for n in (nq, nk, nk))
            ref = attention_math(q, k, v)
            got = triton_attention(q, k, v, block_m=bm, block_n=bn)
            print("fp32", (got - ref).abs().max().item() / max(1.0, ref.abs().max().item()))
            got16 = triton_attention(q.half(), k.half(), v.half(), block_m=bm, block_n=bn)
            assert got16.dtype == torch.float16
            print("fp16", (got16.float() - ref).abs().max().item() / max(1.0, ref.abs().max().item()))
    """)
    for line in out.strip().splitlines():
        kind, err = line.split()
        assert float(err) <= (1e-5 if kind == "fp32" else 2e-3), line


def test_unet_fixture_with_triton_backend():
    """The tiny SD 1 UNet with every attention through the fused kernel (interpreted) reproduces the upstream
    fixture within 1e-5 relative, without falling back to sdpa."""
    out = interpreted(f"""
        import warnings
        import torch
        from safetensors.torch import load_file
        import sdup
        from sdup.nn import use_attention_backend
        import sdup.nn.triton_attention as T
        calls = []
        kernel = T.triton_attention
        T.triton_attention = lambda *a, **k: (calls.append(1), kernel(*a, **k))[1]
        warnings.simplefilter("error")
        m = sdup.load("{FIXTURES / 'sd1' / 'model.ckpt'}", config="{FIXTURES / 'sd1' / 'config.yaml'}")
        d = load_file("{FIXTURES / 'sd1' / 'unet_forward.safetensors'}")
        with torch.no_grad(), use_attention_backend("triton"):
            got = m.unet(d["in.x"], d["in.timesteps"], d["in.context"])
        ref = d["out.model_output"]
        print(len(calls), (got - ref).abs().max().item() / max(1.0, ref.abs().max().item()))
    """, timeout=600)
    n, err = out.split()
    assert int(n) > 0 and float(err) <= 1e-5, out


def test_auto_is_sdpa_on_cpu(monkeypatch):
    """``auto`` (the default) never calls the kernel for CPU tensors."""
    import sdup.nn.triton_attention as T
    monkeypatch.setattr(T, "triton_attention", lambda *a, **k: pytest.fail("kernel called for CPU tensors"))
    q, k, v = (torch.randn(1, 2, 10, 16) for _ in range(3))
    assert A.get_attention_backend() == "auto"
    assert_parity(A.attention(q, k, v), A.attention(q, k, v, backend="sdpa"), tol=0)


def test_triton_backend_sends_wide_heads_and_biases_to_sdpa(monkeypatch):
    """Heads wider than the kernel's MAX_HEAD_DIM (the VAE mid block's 512) and calls with a bias run sdpa, without
    a warning and without giving up the kernel for the calls it can take."""
    import sdup.nn.triton_attention as T
    monkeypatch.setattr(T, "triton_attention", lambda *a, **k: pytest.fail("kernel called"))
    monkeypatch.setitem(A._state, "triton_failed", False)
    q, k, v = (torch.randn(1, 1, 6, T.MAX_HEAD_DIM + 8) for _ in range(3))
    assert_parity(A.attention(q, k, v, backend="triton"), A.attention(q, k, v, backend="sdpa"), tol=0)
    q, k, v = (torch.randn(1, 1, 6, 8) for _ in range(3))
    bias = torch.zeros(1, 1, 1, 6)
    assert_parity(A.attention(q, k, v, backend="triton", bias=bias), A.attention(q, k, v, backend="sdpa", bias=bias),
                  tol=0)
    assert not A._state["triton_failed"]
    assert T.block_sizes(160) == (32, 32, 2) and T.block_sizes(40)[0] == 64


def test_triton_backend_falls_back_with_one_warning(monkeypatch):
    """A kernel that cannot run (here: triton without a GPU, or missing) -> one RuntimeWarning, then sdpa."""
    import sdup.nn.triton_attention as T

    def broken(*a, **k):
        raise RuntimeError("0 active drivers")
    monkeypatch.setattr(T, "triton_attention", broken)
    monkeypatch.setitem(A._state, "triton_failed", False)
    q, k, v = (torch.randn(2, 2, 12, 24) for _ in range(3))
    with pytest.warns(RuntimeWarning, match="triton attention kernel is unavailable"):
        out = A.attention(q, k, v, backend="triton")
    assert_parity(out, A.attention_math(q, k, v))
    assert A._state["triton_failed"]
    with A.use_attention_backend("triton"):
        assert_parity(A.attention(q, k, v), out, tol=0)  # no second warning, no second try
