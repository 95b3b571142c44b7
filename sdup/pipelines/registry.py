"""``UPSCALERS``: name -> ``Upscaler`` record, every upscaler the command line offers (``--model``), in the order
``--model auto`` tries them for a checkpoint's family.  A new upscaler: its module in ``sdup/pipelines/`` ending with
``UPSCALER = Upscaler(...)``, and its module's name as one more row of ``MODULES``."""
from __future__ import annotations

from importlib import import_module

from .upscaler import Upscaler

MODULES = (
    "x4",
    "x2_latent",
    "stablesr",
)

UPSCALERS: dict[str, Upscaler] = {u.name: u for u in (import_module(f"{__package__}.{m}").UPSCALER for m in MODULES)}


def for_family(family: str) -> Upscaler | None:
    """The first upscaler that loads checkpoints of ``family`` (what ``--model auto`` picks), or None."""
    return next((u for u in UPSCALERS.values() if u.loads(family)), None)
