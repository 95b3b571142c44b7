#!/usr/bin/env python
"""sdup's CUDA paths on a real GPU, in about a minute (scripts/gpu_check.sh runs it; the test suite has no GPU):

1. the fused Triton attention kernel (sdup.nn.triton_attention) against the math backend, compiled for the GPU
   (the tests only run it under Triton's CPU interpreter), fp32 / fp16 / bf16, odd sizes and head dims 40..160,
   plus its speed against torch's sdpa on one SD-sized self-attention;
2. the tiny SD 1 fixture UNet loaded on the GPU, attention "auto" (sdpa) and "triton": fp32 (TF32 off) within
   1e-4 of the upstream fixture, and fp16 after sdup.optimize.prepare (channels_last, no OneDNNLinear) within 2e-2;
   the kernel must not have fallen back to sdpa; a 512-wide head (the VAE mid block's) goes to sdpa quietly.

    python scripts/cuda_smoke.py      # exit 0: all passed; one line per check
"""
from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sdup  # noqa: E402
from sdup.nn import use_attention_backend  # noqa: E402
from sdup.nn.attention import attention_math  # noqa: E402
from sdup.optimize import OneDNNLinear, prepare  # noqa: E402

A = importlib.import_module("sdup.nn.attention")  # the module (its name is shadowed by the function)
FIXTURES = ROOT / "tests" / "data" / "fixtures"
KERNEL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}  # of max(1, max |reference|)
FAILED = []


def check(what: str, err: float, tol: float) -> None:
    ok = err <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {what}: {err:.2e} (tol {tol:.0e})", flush=True)
    if not ok:
        FAILED.append(what)


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got.float() - ref.float()).abs().max().item() / max(1.0, ref.float().abs().max().item())


def kernel_checks() -> None:
    from sdup.nn.triton_attention import triton_attention
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(2, 2, 37, 37, 40), (2, 8, 4096, 77, 40), (2, 5, 1024, 1024, 64), (1, 10, 256, 256, 80),
              (1, 4, 130, 77, 160), (2, 8, 1024, 1024, 160), (1, 2, 300, 300, 256)]
    # (B, H, Nq, Nk, D): SD1 cross-attention at 64^2, SD2-style 64/80 heads, SD 1.x's 160 at 32^2, the widest (256)
    for b, h, nq, nk, d in shapes:
        q, k, v = (torch.randn(b, h, n, d, generator=g, device="cuda") for n in (nq, nk, nk))
        ref = attention_math(q, k, v)
        for dtype, tol in KERNEL_TOL.items():
            got = triton_attention(q.to(dtype), k.to(dtype), v.to(dtype))
            assert got.dtype == dtype
            check(f"triton kernel {dtype} {(b, h, nq, nk, d)}", rel(got, ref), tol)
    q, k, v = (torch.randn(2, 8, 4096, 40, generator=g, device="cuda", dtype=torch.float16) for _ in range(3))
    for name, fn in (("triton", lambda: triton_attention(q, k, v)),
                     ("sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        print(f"info {name} fp16 self-attention (2, 8, 4096, 40): {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms",
              flush=True)


def fixture_unet_checks() -> None:
    from safetensors.torch import load_file
    d = {k: v.cuda() for k, v in load_file(FIXTURES / "sd1" / "unet_forward.safetensors").items()}
    ref = d["out.model_output"]
    model = sdup.load(FIXTURES / "sd1" / "model.ckpt", config=FIXTURES / "sd1" / "config.yaml", device="cuda")
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    A._state["triton_failed"] = False
    with torch.inference_mode():
        got = model.unet(d["in.x"], d["in.timesteps"], d["in.context"])
        with use_attention_backend("triton"):
            got_triton = model.unet(d["in.x"], d["in.timesteps"], d["in.context"])
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    check("fixture UNet fp32 on CUDA, attention auto", rel(got, ref), 1e-4)
    check("fixture UNet fp32 on CUDA, attention triton", rel(got_triton, ref), 1e-4)
    model = sdup.load(FIXTURES / "sd1" / "model.ckpt", config=FIXTURES / "sd1" / "config.yaml", device="cuda",
                      dtype=torch.float16)
    fmt = prepare(model)  # "unet channels_last, vae contiguous": the VAE stays fp32
    conv = next(p for p in model.unet.parameters() if p.dim() == 4)
    nhwc = conv.is_contiguous(memory_format=torch.channels_last)
    linears = sum(isinstance(m, OneDNNLinear) for m in model.unet.modules())
    print(f"{'ok  ' if nhwc and not linears else 'FAIL'} prepare on CUDA fp16: {fmt}, {linears} OneDNNLinear",
          flush=True)
    if not nhwc or linears:
        FAILED.append("prepare on CUDA")
    with torch.inference_mode():
        got = model.unet(d["in.x"].half(), d["in.timesteps"], d["in.context"].half())
        with use_attention_backend("triton"):
            via_triton = model.unet(d["in.x"].half(), d["in.timesteps"], d["in.context"].half())
        q = torch.randn(1, 1, 64, 512, device="cuda")
        wide = A.attention(q, q, q, backend="triton")
    check("fixture UNet fp16 prepared, attention auto", rel(got, ref), 2e-2)
    check("fixture UNet fp16 prepared, auto vs triton", rel(got, via_triton), 2e-2)
    check("a 512-wide head through the triton backend (sdpa)", rel(wide, attention_math(q, q, q)), 1e-4)
    if A._state["triton_failed"]:
        FAILED.append("the triton kernel fell back to sdpa")
        print("FAIL the triton kernel fell back to sdpa (see the warning above)", flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("FAIL torch sees no CUDA device", flush=True)
        return 1
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}", flush=True)
    for step in (kernel_checks, fixture_unet_checks):
        try:
            step()
        except Exception as e:  # noqa: BLE001 -- report and go on to the next group
            FAILED.append(step.__name__)
            print(f"FAIL {step.__name__}: {type(e).__name__}: {e}", flush=True)
    print(f"cuda_smoke: {'all passed' if not FAILED else 'FAILED: ' + ', '.join(FAILED)}", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
