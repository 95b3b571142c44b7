"""Speed options applied to a loaded model (``sdup.load(...)``), all opt-in.

    model = sdup.load("x4-upscaler-ema.safetensors")
    compile_model(model)          # torch.compile the UNet forward (and the VAE decoder's), shapes dynamic

``compile_model`` compiles the *forward* of the UNet / VAE decoder in place (the modules, their state dicts and the
key tables stay as they are), with ``dynamic=True`` so that a new latent or tile size does not trigger a
recompile per size (the timestep is a tensor argument, so steps never recompile).  The first call pays the
compilation (minutes for a full-size UNet on a CPU).  Measured with scripts/bench.py; correctness: compiled ==
eager within 1e-5 (tests/test_optimize.py).
"""
from __future__ import annotations

import torch


def compile_model(model, *, unet: bool = True, vae_decoder: bool = True, dynamic: bool = True,
                  mode: str | None = None, backend: str = "inductor"):
    """``torch.compile`` the UNet's and the VAE decoder's ``forward`` of a ``LoadedModel`` in place; returns it."""
    targets = []
    if unet and getattr(model, "unet", None) is not None:
        targets.append(model.unet)
    vae = getattr(model, "vae", None)
    if vae_decoder and vae is not None and hasattr(vae, "decoder"):
        targets.append(vae.decoder)
    for module in targets:
        module.forward = torch.compile(module.forward, dynamic=dynamic, mode=mode, backend=backend)
    return model

