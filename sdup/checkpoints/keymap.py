"""Key remapping as data.

A ``KeyMap`` is a list of ``Entry(sdup_keys, ext_keys, op)``: which tensors of an external layout
(original single file, diffusers folder, k-diffusion dict) make which sdup tensors, and how. The same
entries convert in both directions, so a round trip is exact by construction:

    COPY     one tensor, unchanged
    CONV1X1  external 1x1 conv weight (o, i, 1, 1) <-> sdup Linear weight (o, i)
    CONV1D   external conv1d/kernel-1 weight (o, i, 1) <-> sdup (o, i)
    FLAT     external (n, 1) <-> sdup (n,)
    FUSE     several external tensors concatenated on dim 0 <-> one sdup tensor
    SPLIT    one external tensor <-> several sdup tensors (chunks on dim 0)

Most entries come from *prefix rules*: pairs ``(sdup_prefix, ext_prefix)``; a sdup key takes the
rule with the longest matching prefix (matched at dot boundaries) and keeps its suffix. Tables of
such pairs live in one module per format (``ldm.py``, ``diffusers.py``, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch


@dataclass(frozen=True)
class Op:
    name: str
    to_sdup: Callable[[list], list]
    to_ext: Callable[[list], list]


def _drop_trailing_ones(n: int):
    def f(t: list) -> list:
        shape = tuple(t[0].shape)
        if len(shape) != 2 + n or any(s != 1 for s in shape[2:]):
            want = shape[:2] + (1,) * n if len(shape) >= 2 else f"(out, in{', 1' * n})"
            raise ValueError(f"expected shape {want}, got {shape}")
        return [t[0].reshape(shape[:2])]
    return f


def _flat(t: list) -> list:
    shape = tuple(t[0].shape)
    if len(shape) != 2 or shape[1] != 1:
        raise ValueError(f"expected shape {(shape[0], 1) if shape else '(n, 1)'}, got {shape}")
    return [t[0].reshape(-1)]


COPY = Op("copy", lambda t: t, lambda t: t)
CONV1X1 = Op("conv1x1", _drop_trailing_ones(2), lambda t: [t[0].reshape(*t[0].shape, 1, 1)])
CONV1D = Op("conv1d", _drop_trailing_ones(1), lambda t: [t[0].reshape(*t[0].shape, 1)])
FLAT = Op("flat", _flat, lambda t: [t[0].reshape(-1, 1)])


def _fuse(parts: list) -> list:
    return [torch.cat(parts, dim=0)]


def _split(n: int):
    return lambda t: list(t[0].chunk(n, dim=0))


FUSE = Op("fuse", _fuse, None)  # to_ext is filled per entry (needs the number of parts)
SPLIT = Op("split", None, lambda t: [torch.cat(t, dim=0)])


@dataclass(frozen=True)
class Entry:
    sdup: tuple[str, ...]
    ext: tuple[str, ...]
    op: Op = COPY

    def to_sdup(self, tensors: list) -> list:
        if self.op is SPLIT:
            return _split(len(self.sdup))(tensors)
        return self.op.to_sdup(tensors)

    def to_ext(self, tensors: list) -> list:
        if self.op is FUSE:
            return _split(len(self.ext))(tensors)
        return self.op.to_ext(tensors)


class KeyMismatch(ValueError):
    """Missing or unexpected keys; the message lists them."""

    def __init__(self, what: str, missing: Sequence[str], unexpected: Sequence[str]):
        self.what, self.missing, self.unexpected = what, list(missing), list(unexpected)
        lines = [f"{what}: {len(self.missing)} missing and {len(self.unexpected)} unexpected key(s)"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            for k in keys[:20]:
                lines.append(f"  {label}: {k}")
            if len(keys) > 20:
                lines.append(f"  ... and {len(keys) - 20} more {label}")
        super().__init__("\n".join(lines))

    def one_line(self, sample: int = 2) -> str:
        """The counts and a few keys of each kind, for a one-line error."""
        parts = [f"{label} {', '.join(keys[:sample])}{', ...' if len(keys) > sample else ''}"
                 for label, keys in (("missing", self.missing), ("unexpected", self.unexpected)) if keys]
        return (f"{self.what}: {len(self.missing)} missing and {len(self.unexpected)} unexpected key(s), e.g. "
                f"{'; '.join(parts)} (a checkpoint of another family or size? `python -m sdup inspect` lists them)")


def _match(key: str, prefix: str) -> bool:
    return prefix == "" or key == prefix or key.startswith(prefix + ".")


def rename(sdup_key: str, rules: Sequence[tuple[str, str]]) -> str:
    """Apply the longest matching prefix rule to one sdup key."""
    best = None
    for src, dst in rules:
        if _match(sdup_key, src) and (best is None or len(src) > len(best[0])):
            best = (src, dst)
    if best is None:
        raise KeyError(f"no rule maps sdup key {sdup_key!r}")
    src, dst = best
    rest = sdup_key[len(src):].lstrip(".")
    return ".".join(p for p in (dst, rest) if p)


class KeyMap:
    def __init__(self, entries: Iterable[Entry]):
        self.entries = list(entries)

    @classmethod
    def from_rules(cls, sdup_keys: Iterable[str], rules: Sequence[tuple[str, str]],
                   ops: Mapping[str, Op] | None = None, explicit: Iterable[Entry] = ()) -> "KeyMap":
        """One COPY entry per sdup key (renamed by ``rules``), except keys covered by ``explicit``
        entries; ``ops`` overrides the op by exact sdup key (e.g. CONV1X1 for a 1x1-conv weight)."""
        explicit = list(explicit)
        covered = {k for e in explicit for k in e.sdup}
        ops = ops or {}
        entries = [Entry((k,), (rename(k, rules),), ops.get(k, COPY)) for k in sdup_keys if k not in covered]
        return cls(entries + explicit)

    def ext_keys(self) -> set[str]:
        return {k for e in self.entries for k in e.ext}

    def sdup_keys(self) -> set[str]:
        return {k for e in self.entries for k in e.sdup}

    def to_sdup(self, ext: Mapping[str, torch.Tensor], what: str = "checkpoint",
                ignore: Callable[[str], bool] = lambda k: False, strict: bool = True,
                convert: Callable[[list, list], list] | None = None) -> dict:
        """External state dict -> sdup state dict. Keys for which ``ignore(key)`` is true may be present
        and are dropped on purpose; anything else extra, or anything missing, raises ``KeyMismatch``.
        ``convert(ext_tensors, sdup_tensors) -> sdup_tensors`` runs on each entry as it is mapped (the loader
        casts there, one entry at a time)."""
        missing = [k for e in self.entries for k in e.ext if k not in ext]
        unexpected = sorted(k for k in ext if k not in self.ext_keys() and not ignore(k))
        if strict and (missing or unexpected):
            raise KeyMismatch(what, missing, unexpected)
        out = {}
        for e in self.entries:
            if all(k in ext for k in e.ext):
                src = [ext[k] for k in e.ext]
                try:
                    mapped = e.to_sdup(src)
                except (ValueError, RuntimeError) as err:  # a reshape / concatenation that does not fit
                    found = ", ".join(f"{k} {tuple(ext[k].shape)}" for k in e.ext)
                    raise ValueError(f"{what}: {found} -> {', '.join(e.sdup)} ({e.op.name}): "
                                     f"{str(err).splitlines()[0]}") from None
                out.update(zip(e.sdup, convert(src, mapped) if convert else mapped))
        return out

    def to_ext(self, sd: Mapping[str, torch.Tensor]) -> dict:
        out = {}
        for e in self.entries:
            out.update(zip(e.ext, e.to_ext([sd[k] for k in e.sdup])))
        return out

    def shapes_to_sdup(self, ext_shapes: Mapping[str, Sequence[int]], **kw) -> dict[str, tuple]:
        """The same mapping on shapes only (meta tensors): for manifests and safetensors headers."""
        metas = {k: torch.empty(tuple(s), device="meta") for k, s in ext_shapes.items()}
        return {k: tuple(v.shape) for k, v in self.to_sdup(metas, **kw).items()}

    def with_prefix(self, sdup_prefix: str, ext_prefix: str) -> "KeyMap":
        def add(p, keys):
            return tuple(f"{p}{k}" for k in keys)
        return KeyMap(Entry(add(sdup_prefix, e.sdup), add(ext_prefix, e.ext), e.op) for e in self.entries)

    def __add__(self, other: "KeyMap") -> "KeyMap":
        return KeyMap(self.entries + other.entries)
