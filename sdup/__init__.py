"""sdup: Stable Diffusion upscalers in plain PyTorch."""
from .checkpoints import CheckpointError, KeyMismatch, LoadedModel, detect, load, save_sdup

__version__ = "0.1.0"
