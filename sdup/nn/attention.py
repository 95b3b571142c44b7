"""One attention entry point with interchangeable backends.

    out = attention(q, k, v)          # q: (B, H, Nq, D), k/v: (B, H, Nk, D) -> (B, H, Nq, D)

Backends (pick with ``set_attention_backend`` or the ``use_attention_backend`` context manager):

* ``"auto"``    (default) ``"triton"`` for CUDA tensors when triton is installed and its kernel compiles, else
  ``"sdpa"`` (so on the CPU: sdpa).
* ``"sdpa"``    ``torch.nn.functional.scaled_dot_product_attention``.
* ``"triton"``  sdup's fused flash-attention forward (``sdup.nn.triton_attention``; CUDA, or the CPU under
  ``TRITON_INTERPRET=1``).  If triton is missing or the kernel fails, it falls back to sdpa with one warning.
* ``"math"``    the readable reference: softmax(q kᵀ / √D) v, logits and softmax in fp32.
* ``"chunked"`` the math path over blocks of queries; peak memory is chunk × Nk, never Nq × Nk.
  Needed for the VAE mid-block at large resolutions (a 512² map is 262144 tokens).

No model here uses an attention mask, so there is none in the signature.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "math", "chunked", "triton")
_state = {"backend": "auto", "chunk_size": 4096, "triton_failed": False}


def set_attention_backend(name: str, chunk_size: int | None = None) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _state["backend"] = name
    if chunk_size is not None:
        _state["chunk_size"] = int(chunk_size)


def get_attention_backend() -> str:
    return _state["backend"]


@contextlib.contextmanager
def use_attention_backend(name: str, chunk_size: int | None = None):
    saved = dict(_state)
    set_attention_backend(name, chunk_size)
    try:
        yield
    finally:
        _state.update(saved)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference path. Logits and softmax are computed in fp32 (what SD2-family models need in fp16)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    weights = logits.softmax(dim=-1)
    return (weights @ v.float()).to(q.dtype)


def attention_chunked(q, k, v, chunk_size: int | None = None) -> torch.Tensor:
    """The math path over query blocks: memory O(chunk_size × Nk) instead of O(Nq × Nk)."""
    chunk_size = chunk_size or _state["chunk_size"]
    if q.shape[-2] <= chunk_size:
        return attention_math(q, k, v)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    for start in range(0, q.shape[-2], chunk_size):
        stop = start + chunk_size
        out[..., start:stop, :] = attention_math(q[..., start:stop, :], k, v)
    return out


def _triton(q, k, v) -> torch.Tensor | None:
    """The fused kernel, or None (after one warning) when triton is missing or the kernel fails."""
    if _state["triton_failed"]:
        return None
    try:
        from .triton_attention import triton_attention
        return triton_attention(q, k, v)
    except Exception as e:  # noqa: BLE001 -- any compile / launch problem: fall back, never crash inference
        _state["triton_failed"] = True
        warnings.warn(f"sdup: the triton attention kernel is unavailable ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); using sdpa", RuntimeWarning, stacklevel=3)
        return None


def _use_triton(q: torch.Tensor) -> bool:
    if not q.is_cuda or _state["triton_failed"]:
        return False
    from .triton_attention import available
    return available()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    backend = backend or _state["backend"]
    if backend == "auto":
        backend = "triton" if _use_triton(q) else "sdpa"
    if backend == "triton":
        out = _triton(q, k, v)
        if out is not None:
            return out
        backend = "sdpa"
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        return attention_math(q, k, v)
    if backend == "chunked":
        return attention_chunked(q, k, v)
    raise ValueError(f"unknown attention backend {backend!r}")


def project_qkv(module, x: torch.Tensor, context: torch.Tensor | None = None):
    """(q, k, v) token projections, each (B, N, inner), of a module with ``q_proj``/``k_proj``/``v_proj`` Linears.

    After ``sdup.optimize.fuse_qkv`` a self-attention module holds one ``qkv_proj`` (rows [q; k; v]) instead: one
    matmul of 3x the width instead of three (the outputs are column slices of it)."""
    fused = getattr(module, "qkv_proj", None)
    if fused is None:
        context = x if context is None else context
        return module.q_proj(x), module.k_proj(context), module.v_proj(context)
    if context is None:
        return fused(x).chunk(3, dim=-1)
    w, b = fused.weight.chunk(3), (None,) * 3 if fused.bias is None else fused.bias.chunk(3)
    return F.linear(x, w[0], b[0]), F.linear(context, w[1], b[1]), F.linear(context, w[2], b[2])


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H*D) -> (B, H, N, D)"""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (B, N, H*D)"""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)
