"""Seeds and random-number generators: one CPU generator per sample, so sample i does not depend on the batch.

    sample_seeds(seed, n)                 [seed, seed + 1, ...] (a random base seed when None), or the given list
    make_generators(seeds)                one seeded ``torch.Generator`` per sample
    resolve_generators(seed, generator, n)  (seeds recorded, generators used): from a seed, or the caller's
"""
from __future__ import annotations

import random
from typing import Sequence

import torch


def sample_seeds(seed: int | Sequence[int] | None, n: int) -> list[int]:
    """Per-sample seeds: ``seed, seed + 1, ..., seed + n - 1`` for an int (a random base seed when None), or the
    given list (length n). Seeds must be in [0, 2**63)."""
    if seed is None:
        seed = random.SystemRandom().randrange(2 ** 32)
    if isinstance(seed, bool) or not isinstance(seed, (int, Sequence)):
        raise ValueError(f"seed must be an int or a list of ints, got {seed!r}")
    seeds = [int(seed) + i for i in range(n)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {n}")
    if any(not 0 <= s < 2 ** 63 for s in seeds):
        raise ValueError("seeds must be in [0, 2**63)")
    return seeds


def make_generators(seeds: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One generator per sample (CPU by default: the same numbers on every machine, as diffusers' CPU
    generators); draws from ``generators[i]`` make sample i independent of the batch it is in."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def resolve_generators(seed, generator, batch: int) -> tuple[list[int] | None, object]:
    """(seeds, generators): one generator per sample from ``seed`` (seed, seed+1, ...), so sample i is the same in
    a batch of 1 or 3; or the caller's generator(s) as given (then no seeds are recorded)."""
    if generator is None:
        seeds = sample_seeds(seed, batch)
        return seeds, make_generators(seeds)
    generators = list(generator) if isinstance(generator, (list, tuple)) else generator
    if isinstance(generators, list) and len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch}")
    return None, generators
