"""sdup: Stable Diffusion upscalers in plain PyTorch."""
__version__ = "0.1.0"

_CHECKPOINT_NAMES = ("CheckpointError", "KeyMismatch", "LoadedModel", "detect", "load", "save_sdup")
__all__ = list(_CHECKPOINT_NAMES)


def __getattr__(name: str):
    """``sdup.load`` and friends, from ``sdup.checkpoints`` on first use: importing ``sdup`` itself stays free of
    torch, so the programs guard their start-up (``sdup.fileio.run_main``) before torch is imported."""
    from importlib import import_module
    if name in _CHECKPOINT_NAMES:
        return getattr(import_module(".checkpoints", __name__), name)
    try:  # a subpackage not imported yet (``sdup.checkpoints.loader`` after a bare ``import sdup``), as before
        return import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module 'sdup' has no attribute {name!r}")
