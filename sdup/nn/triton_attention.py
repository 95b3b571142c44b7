"""A fused attention forward in Triton (flash-attention style), the ``"triton"`` backend of ``sdup.nn.attention``.

    out = triton_attention(q, k, v)     # q: (B, H, Nq, D), k / v: (B, H, Nk, D) -> (B, H, Nq, D), q's dtype

One program computes BLOCK_M query rows of one (batch, head): it walks over the keys in blocks of BLOCK_N, keeping
the running row maximum m, the running softmax denominator l and the un-normalised output in fp32 (online softmax:
when the maximum grows by delta, the old l and output are rescaled by exp(-delta)), and writes out / l at the end.
The Nq x Nk logits never exist in memory.  Any Nq, Nk and head dim D <= 256 (D is padded to a power of two >= 16 with
masked loads; padded keys get -inf logits).  fp16 / bf16 inputs use the tensor-core dot with fp32 accumulation;
fp32 inputs use the exact ("ieee") dot so the result matches the math backend to ~1e-6.

Runs on CUDA; on the CPU only under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported),
which is how the tests check it (tests/test_attention_backends.py).  ``available()`` says whether triton imports.
"""
from __future__ import annotations

import math

import torch

try:  # triton is optional: without it the backend is simply unavailable
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None


MAX_HEAD_DIM = 256  # larger heads do not fit a block of keys and values in shared memory


def available() -> bool:
    return triton is not None


def block_sizes(head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_stages) for a head dim: the key / value blocks of every pipeline stage, and the
    query block, must fit one multiprocessor's shared memory (227 KiB on an H100 / H200). 64 x 64 with a 256-wide
    padded head (SD 1.x's 160) needed 336 KiB there."""
    if head_dim <= 64:
        return 64, 64, 3
    if head_dim <= 128:
        return 64, 32, 2
    return 32, 32, 2


if triton is not None:
    @triton.jit
    def _attention_forward(Q, K, V, O, scale, n_q, n_k, head_dim,
                           sqb, sqn, skb, skn, svb, svn, sob, son,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           PRECISION: tl.constexpr):
        pid_m = tl.program_id(0)                     # which block of query rows
        bh = tl.program_id(1)                        # which (batch, head)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < n_q
        dim_ok = dims < head_dim
        q = tl.load(Q + bh * sqb + rows[:, None] * sqn + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                    other=0.0)                       # (BLOCK_M, BLOCK_D)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)   # running row maximum of the logits
        l_i = tl.zeros([BLOCK_M], tl.float32)                 # running softmax denominator
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)        # running sum of p v (not normalised)
        for start in range(0, n_k, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < n_k
            k = tl.load(K + bh * skb + cols[:, None] * skn + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :],
                        other=0.0)                   # (BLOCK_N, BLOCK_D)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale   # (BLOCK_M, BLOCK_N) fp32 logits
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)              # rescales what was accumulated under the old maximum
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + bh * svb + cols[:, None] * svn + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :],
                        other=0.0)                   # (BLOCK_N, BLOCK_D)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(O + bh * sob + rows[:, None] * son + dims[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & dim_ok[None, :])


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_m: int | None = None,
                     block_n: int | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √D) v with the fused kernel (module docstring). Shapes as ``sdup.nn.attention``; head dim
    D <= ``MAX_HEAD_DIM``; blocks (None: ``block_sizes(D)``)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    B, H, n_q, D = q.shape
    if D > MAX_HEAD_DIM:
        raise ValueError(f"the triton attention kernel takes head dims up to {MAX_HEAD_DIM}, got {D}")
    bm, bn, stages = block_sizes(D)
    block_m, block_n = block_m or bm, block_n or bn
    n_k = k.shape[-2]
    if k.shape[:2] != (B, H) or v.shape != k.shape or k.shape[-1] != D:
        raise ValueError(f"attention shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    q3 = q.reshape(B * H, n_q, D).contiguous()
    k3 = k.reshape(B * H, n_k, D).to(q.dtype).contiguous()
    v3 = v.reshape(B * H, n_k, D).to(q.dtype).contiguous()
    out = torch.empty_like(q3)
    block_d = max(16, triton.next_power_of_2(D))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    grid = (triton.cdiv(n_q, block_m), B * H)
    _attention_forward[grid](q3, k3, v3, out, 1.0 / math.sqrt(D), n_q, n_k, D,
                             q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
                             out.stride(0), out.stride(1),
                             BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision,
                             num_stages=stages)
    return out.view(B, H, n_q, D)
