"""One attention entry point with interchangeable backends.

    out = attention(q, k, v)          # q: (B, H, Nq, D), k/v: (B, H, Nk, D) -> (B, H, Nq, D)
    out = attention(q, k, v, bias=b)  # b: added to the logits, broadcastable to (B, H, Nq, Nk) (e.g. a key mask)

Backends (pick with ``set_attention_backend`` or the ``use_attention_backend`` context manager):

* ``"auto"``    (default) ``"sdpa"`` on every device. Measured on an NVIDIA H200 (torch 2.11, docs/bench.md), torch's
  sdpa beat sdup's Triton kernel inside the x4 UNet (128² latent, batch 2: 32.9 against 37.0 ms in fp16, 33.3
  against 46.1 ms in fp32), so the kernel is opt-in.
* ``"sdpa"``    ``torch.nn.functional.scaled_dot_product_attention``.
* ``"triton"``  sdup's fused flash-attention forward (``sdup.nn.triton_attention``, head dims up to 256; CUDA, or
  the CPU under ``TRITON_INTERPRET=1``): a readable kernel to study and change. Larger heads (the VAE mid block's
  512) run sdpa; if triton is missing or the kernel fails, it falls back to sdpa with one warning.
* ``"math"``    the readable reference: softmax(q kᵀ / √D) v, logits and softmax in fp32.
* ``"chunked"`` blocks of ``chunk_size`` queries, each through ``chunk_backend`` (default ``"math"``: peak memory
  chunk × Nk, never Nq × Nk).  The tiled VAE runs the mid-block attention this way (a 512² map is 262144 tokens).

Every backend takes ``bias``; the Triton kernel has none, so a call with a bias runs sdpa (``attn_mask``) instead.

Hooks: the model layers pass ``layer=self``; a layer with hooks attached (``sdup.nn.hooks.attention_hooks``, by name)
runs the math path through them, ``fn(name, q, k, v, probs)`` reading or replacing the probabilities (or the output);
every other call takes the selected backend exactly as without hooks (docs/research.md).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "math", "chunked", "triton")
_state = {"backend": "auto", "chunk_size": 4096, "chunk_backend": "math", "triton_failed": False, "group": None}

# ------------------------------------------------------------------------------------------------
# per-layer hooks (attached by ``sdup.nn.hooks.attention_hooks``)

ATTENTION_LAYER_TYPES: list[type] = []  # the module classes that pass ``layer=self`` to ``attention``
_hooks: dict = {}                       # module -> [(name, fn), ...] in the order they were attached


def attention_layer(cls: type) -> type:
    """Class decorator: ``cls`` calls ``attention(..., layer=self)``, so ``sdup.nn.hooks`` can name and hook it."""
    ATTENTION_LAYER_TYPES.append(cls)
    return cls


class AttentionOutput(NamedTuple):
    """What a hook returns to replace the attention output itself, (B, H, Nq, Dv), instead of the probabilities."""
    out: torch.Tensor


def _hooked(hooks, q, k, v, bias) -> torch.Tensor:
    """The math path with ``fn(name, q, k, v, probs)`` of every hook in turn: None keeps the probabilities, a tensor
    of their shape replaces them, an ``AttentionOutput`` is the result (later hooks are not called)."""
    probs = attention_probs(q, k, bias)
    for name, fn in hooks:
        got = fn(name, q, k, v, probs)
        if isinstance(got, AttentionOutput):
            expected = q.shape[:-1] + v.shape[-1:]
            if tuple(got.out.shape) != tuple(expected):
                raise ValueError(f"attention hook on {name}: AttentionOutput of shape {tuple(got.out.shape)}, "
                                 f"expected {tuple(expected)}")
            return got.out.to(q.dtype)
        if got is not None:
            if not isinstance(got, torch.Tensor) or got.shape != probs.shape:
                what = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise ValueError(f"attention hook on {name} returned {what}: return None, probabilities of shape "
                                 f"{tuple(probs.shape)}, or AttentionOutput(out)")
            probs = got.float()
    return (probs @ v.float()).to(q.dtype)


def set_attention_backend(name: str, chunk_size: int | None = None, chunk_backend: str | None = None,
                          group=None) -> None:
    """``chunk_size`` / ``chunk_backend``: the query block of the ``"chunked"`` backend and what runs each block;
    ``group`` (``sdup.distributed.Group``): the blocks are split over its ranks (each rank needs the same q, k, v)."""
    for backend in (name, chunk_backend or "math"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if chunk_backend == "chunked":
        raise ValueError("the chunked backend cannot run its blocks with itself")
    _state["backend"] = name
    if chunk_size is not None:
        _state["chunk_size"] = int(chunk_size)
    if chunk_backend is not None:
        _state["chunk_backend"] = chunk_backend
    _state["group"] = group


def get_attention_backend() -> str:
    return _state["backend"]


@contextlib.contextmanager
def use_attention_backend(name: str, chunk_size: int | None = None, chunk_backend: str | None = None, group=None):
    saved = dict(_state)
    set_attention_backend(name, chunk_size, chunk_backend, group)
    try:
        yield
    finally:
        _state.update(saved)


def attention_probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √D + bias) over the keys: fp32 (B, H, Nq, Nk), every row sums to 1."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    if bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1)


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference path. Logits and softmax are computed in fp32 (what SD2-family models need in fp16)."""
    return (attention_probs(q, k, bias) @ v.float()).to(q.dtype)


def attention_chunked(q, k, v, chunk_size: int | None = None, bias: torch.Tensor | None = None,
                      backend: str | None = None) -> torch.Tensor:
    """``backend`` (default: the ``chunk_backend`` setting, ``"math"``) over blocks of ``chunk_size`` queries:
    with the math path, memory O(chunk_size × Nk) instead of O(Nq × Nk)."""
    chunk_size = chunk_size or _state["chunk_size"]
    backend = backend or _state["chunk_backend"]
    if q.shape[-2] <= chunk_size:
        return attention(q, k, v, backend=backend, bias=bias)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    starts = range(0, q.shape[-2], chunk_size)

    def block(start):
        rows = slice(start, start + chunk_size)
        block_bias = bias if bias is None or bias.dim() < 2 or bias.shape[-2] == 1 else bias[..., rows, :]
        return attention(q[..., rows, :], k, v, backend=backend, bias=block_bias)

    group = _state["group"]
    if group is None:
        for start in starts:
            out[..., start:start + chunk_size, :] = block(start)
        return out
    from ..distributed import exchange_tensors, shard  # every rank's blocks, on every rank
    for start, o in exchange_tensors(lambda: {s: block(s) for s in shard(starts, group)}, group,
                                     device=q.device).items():
        out[..., start:start + chunk_size, :] = o
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str | None = None,
              bias: torch.Tensor | None = None, layer=None) -> torch.Tensor:
    """softmax(q kᵀ / √D + bias) v with the selected backend; ``bias`` broadcastable to (B, H, Nq, Nk) or None.
    ``layer``: the calling module (an ``attention_layer``); when hooks are attached to it (``attention_hooks``) the
    call runs the math path through them instead of ``backend``."""
    if layer is not None and _hooks:
        hooks = _hooks.get(layer)
        if hooks:
            return _hooked(hooks, q, k, v, bias)
    backend = backend or _state["backend"]
    if backend == "auto":
        backend = "sdpa"
    if backend == "triton":
        from .triton_attention import MAX_HEAD_DIM
        ok = bias is None and q.shape[-1] <= MAX_HEAD_DIM  # the kernel has no bias input
        out = _triton(q, k, v) if ok else None
        if out is not None:
            return out
        backend = "sdpa"
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype))
    if backend == "math":
        return attention_math(q, k, v, bias)
    if backend == "chunked":
        return attention_chunked(q, k, v, bias=bias)
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
