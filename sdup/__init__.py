"""sdup: Stable Diffusion upscalers in plain PyTorch."""
__version__ = "0.1.0"

_CHECKPOINT_NAMES = ("CheckpointError", "KeyMismatch", "LoadedModel", "detect", "load", "save_sdup")
__all__ = list(_CHECKPOINT_NAMES)


def __getattr__(name: str):
    """``sdup.load`` and friends, from ``sdup.checkpoints`` on first use: importing ``sdup`` itself stays free of
    torch, so the programs guard their start-up (``sdup.fileio.run_main``) before torch is imported."""
    if name in _CHECKPOINT_NAMES:
        from . import checkpoints
        return getattr(checkpoints, name)
    raise AttributeError(f"module 'sdup' has no attribute {name!r}")
