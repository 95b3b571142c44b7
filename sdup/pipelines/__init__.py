"""Inference pipelines: one module per model (x4, x2_latent, stablesr, txt2img) on the skeleton of ``job``; shared
steps in one module each: ``conditioning`` (prompts), ``seeds``, ``checks`` (arguments), ``decoding`` (the VAE),
``result``; image files are ``sdup.images``."""
