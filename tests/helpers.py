"""Shared test utilities: data paths, the parity criterion, and weight randomisation."""
from __future__ import annotations

from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"
FIXTURES = DATA / "fixtures"
MANIFESTS = DATA / "manifests"

FORWARD_TOL = 1e-5   # one forward: max|Δ| <= 1e-5 * max(1, max|ref|)
SAMPLER_TOL = 1e-4   # a whole sampler run


def max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return (out.double() - ref.double()).abs().max().item()


def assert_parity(out: torch.Tensor, ref: torch.Tensor, tol: float = FORWARD_TOL, what: str = "") -> float:
    """The project's parity criterion; returns the measured error for reporting."""
    err = max_err(out, ref)
    scale = max(1.0, ref.abs().max().item())
    assert err <= tol * scale, f"{what}: max|Δ| = {err:.3e} > {tol:g} * {scale:.3g}"
    return err


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between two float32 tensors in units in the last place (0: bit-identical). Floats map to
    integers in their own order (sign-magnitude -> two's complement), so neighbouring floats are 1 apart."""
    assert a.shape == b.shape, (a.shape, b.shape)

    def ordered(x):
        bits = x.detach().float().contiguous().view(torch.int32).long()
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0


def assert_within_ulps(out: torch.Tensor, ref: torch.Tensor, ulps: int, what: str = "") -> int:
    """For float32 values computed by the same formula with different (faithfully rounded) kernels: each result
    is within 1 ulp of the true value, so two of them are at most 1 ulp apart per rounded library call."""
    dist = ulp_distance(out, ref)
    assert dist <= ulps, f"{what}: {dist} ulps apart > {ulps}"
    return dist


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Fill every parameter with seeded noise so no branch is trivially zero (zero-init convs,
    unit norms); norm weights are centred on 1."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        is_norm = "norm" in name and name.endswith("weight") and p.ndim == 1
        p.copy_(1.0 + noise if is_norm else noise)
    return module
