"""Building blocks: timestep embeddings (both conventions), the attention backends, GroupNorm32."""
import pytest
import torch

from helpers import assert_parity
from sdup.nn import (GroupNorm32, attention, attention_chunked, attention_math, set_attention_backend,
                     get_attention_backend, timestep_embedding, use_attention_backend)


@pytest.mark.parametrize("flip,shift", [(True, 0), (False, 1), (True, 1)])
def test_timestep_embedding_matches_diffusers(flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0, 1, 37, 500.5, 981])
    ref = get_timestep_embedding(t, 320, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert_parity(timestep_embedding(t, 320, flip_sin_to_cos=flip, downscale_freq_shift=shift), ref)


@pytest.mark.parametrize("nq,nk,chunk", [(100, 77, 7), (64, 64, 64), (33, 200, 32)])
def test_attention_backends_agree(nq, nk, chunk):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, n, 16, generator=g) for n in (nq, nk, nk))
    ref = attention_math(q, k, v)
    explicit = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    assert_parity(ref, explicit)
    assert_parity(attention(q, k, v, backend="sdpa"), ref)
    assert_parity(attention_chunked(q, k, v, chunk_size=chunk), ref)


def test_chunked_attention_never_builds_the_full_matrix(monkeypatch):
    import importlib
    A = importlib.import_module("sdup.nn.attention")
    seen = []
    real = A.attention_math
    monkeypatch.setattr(A, "attention_math", lambda q, k, v, bias=None: seen.append(q.shape[-2]) or real(q, k, v, bias))
    q = torch.randn(1, 1, 1000, 8)
    A.attention_chunked(q, q, q, chunk_size=128)
    assert max(seen) == 128 and sum(seen) == 1000


@pytest.mark.parametrize("bias_shape", [(2, 1, 1, 45), (2, 3, 70, 45), (70, 45)])
@pytest.mark.parametrize("backend", ["sdpa", "math", "chunked", "triton", "auto"])
def test_attention_bias_on_every_backend(backend, bias_shape):
    """An additive logit bias (a key mask (B, 1, 1, Nk) as the K-UNet uses, a full (B, H, Nq, Nk) one, a
    broadcast (Nq, Nk) one) gives softmax(q k^T / sqrt(D) + bias) v on every backend; triton (no bias input) and auto
    run sdpa then, without trying the kernel."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (70, 45, 45))
    bias = torch.randn(bias_shape, generator=g) * 3
    if bias_shape[1] == 1:
        bias[..., 30:] = -10000.0  # padded keys
    explicit = torch.softmax(q @ k.transpose(-1, -2) / 4.0 + bias, dim=-1) @ v
    with use_attention_backend(backend, chunk_size=16):
        out = attention(q, k, v, bias=bias)
    assert_parity(out, explicit)
    assert (attention(q, k, v) - out).abs().max() > 1e-2  # the bias does something


@pytest.mark.parametrize("inner", ["math", "sdpa"])
def test_chunked_backend_runs_its_blocks_with_the_chunk_backend(inner, monkeypatch):
    import importlib
    A = importlib.import_module("sdup.nn.attention")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (100, 30, 30))
    bias = torch.randn(1, 2, 100, 30, generator=g)
    ref = attention_math(q, k, v, bias)
    calls = []
    real = A.attention
    monkeypatch.setattr(A, "attention", lambda q, k, v, backend=None, bias=None: (
        calls.append((backend, q.shape[-2], None if bias is None else bias.shape[-2])),
        real(q, k, v, backend, bias))[1])
    with use_attention_backend("chunked", chunk_size=32, chunk_backend=inner):
        assert_parity(real(q, k, v, bias=bias), ref)
    assert calls == [(inner, 32, 32), (inner, 32, 32), (inner, 32, 32), (inner, 4, 4)]
    assert get_attention_backend() == "auto" and A._state["chunk_backend"] == "math"
    with pytest.raises(ValueError, match="itself"):
        set_attention_backend("chunked", chunk_backend="chunked")


def test_backend_switching_and_errors():
    assert get_attention_backend() == "auto"  # sdpa on every device (the triton kernel is opt-in)
    with use_attention_backend("math"):
        assert get_attention_backend() == "math"
    assert get_attention_backend() == "auto"
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend("flash9000")


def test_half_precision_math_attention_softmax_in_fp32():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 50, 64, generator=g).half() * 100 for _ in range(3))
    assert not torch.isfinite(q @ k.transpose(-1, -2)).all()  # fp16 logits would overflow
    out = attention_math(q, k, v)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    assert_parity(out.float(), attention_math(q.float(), k.float(), v.float()), tol=1e-3)


def test_groupnorm32_computes_in_fp32():
    gn = GroupNorm32(2, 4, eps=1e-5)
    x = torch.randn(2, 4, 3, 3) * 100
    out = gn(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert_parity(out.float(), gn(x), tol=2e-2)


@pytest.mark.parametrize("shape,stride", [((2, 24, 8, 8), 1), ((1, 24, 30, 20), 1), ((3, 24, 16, 12), 2)])
def test_conv2d_small_map_path_matches_nn_conv2d(shape, stride, monkeypatch):
    """sdup's Conv2d runs small fp32 CPU maps (here: the first and third shapes) through the im2col kernel instead of
    nn.Conv2d's default: the same output within fp32 rounding, the same gradients, oneDNN's global switch untouched,
    a wrong input still a RuntimeError."""
    import sdup.nn.layers as L
    default_calls = []
    real = torch.nn.Conv2d.forward
    monkeypatch.setattr(torch.nn.Conv2d, "forward", lambda self, x: (default_calls.append(1), real(self, x))[1])
    g = torch.Generator().manual_seed(0)
    conv = L.Conv2d(24, 16, 3, stride=stride, padding=1)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    assert torch.is_grad_enabled()  # no test module may switch autograd off for the others (conftest.no_grad)
    out = conv(x)
    ref = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=stride, padding=1)
    grads = torch.autograd.grad(out.square().sum(), (x, conv.weight, conv.bias))
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, conv.weight, conv.bias))
    assert_parity(out, ref)
    small = shape[0] * shape[2] * shape[3] // stride ** 2 <= L.SMALL_MAP_POSITIONS
    assert default_calls == ([] if small else [1]) and torch.backends.mkldnn.enabled
    for got, want in zip(grads, ref_grads):
        assert_parity(got, want)
    with pytest.raises(RuntimeError):
        conv(torch.randn(2, 5, 8, 8))  # wrong channel count


def test_conv2d_small_map_path_keeps_grouped_and_dilated_convs_on_the_default():
    import sdup.nn.layers as L
    x = torch.randn(2, 8, 8, 8)
    for conv in (L.Conv2d(8, 8, 3, padding=1, groups=2), L.Conv2d(8, 8, 3, padding=2, dilation=2),
                 L.Conv2d(8, 8, 3, padding="same"), L.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")):
        with torch.no_grad():
            assert_parity(conv(x), torch.nn.Conv2d.forward(conv, x))
