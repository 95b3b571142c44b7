"""Inference pipelines: function-style, one module per model (txt2img, ...); shared helpers in ``common``."""
