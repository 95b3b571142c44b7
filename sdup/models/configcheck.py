"""The sizes of a model configuration checked before any module is built: a YAML anyone may have edited (``--config``)
must not build a model of a trillion channels, or fail deep inside torch with a traceback.

    cfg = check_config(UNetConfig(**fields))      # ValueError naming the field, or cfg unchanged

Each field is checked against the kind of its default: a bool is a bool; an int is an int in 1..MAX_SIZE (-1..
for fields whose default is -1 or 0, e.g. ``num_head_channels``), counts of repeated blocks at most MAX_REPEAT; a
tuple holds at most MAX_LEVELS such ints; a float is finite; a field whose default is None takes None or an int.
"""
from __future__ import annotations

import math
from dataclasses import fields

MAX_SIZE = 1 << 15     # channels, dims, classes: far above any released model (1280 channels, 1000 classes)
MAX_REPEAT = 64        # blocks per level, transformer depth
MAX_LEVELS = 16        # channel multipliers, attention resolutions
REPEATS = ("num_res_blocks", "transformer_depth", "depth")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _int_problem(name: str, v, lo: int) -> str | None:
    top = MAX_REPEAT if any(r in name for r in REPEATS) else MAX_SIZE
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= top:
        return f"an integer in {lo}..{top}"
    return None


def _problem(name: str, default, v) -> str | None:
    if isinstance(default, bool):
        return None if isinstance(v, bool) else "true or false"
    if isinstance(default, int):
        return _int_problem(name, v, -1 if default <= 0 else 1)
    if isinstance(default, float):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return None if ok else "a finite number"
    if isinstance(default, str):
        return None if isinstance(v, str) else "a string"
    if isinstance(default, tuple) or (default is None and isinstance(v, tuple)):
        if not isinstance(v, tuple) or len(v) > MAX_LEVELS:
            return f"a list of at most {MAX_LEVELS} values"
        bad = [e for e in v if _problem(name, False if isinstance(e, bool) else 1, e)]
        return f"a list of integers in 0..{MAX_SIZE}" if bad or any(e < 0 for e in v) else None
    if default is None:
        return None if v is None else _int_problem(name, v, 1)
    return None


def check_config(cfg):
    """``cfg`` (a config dataclass) unchanged, or a ValueError "config: Class.field = value: not ..."."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        why = _problem(f.name, f.default, v)
        if why:
            raise ValueError(f"config: {type(cfg).__name__}.{f.name} = {_short(v)} must be {why}")
    return cfg
