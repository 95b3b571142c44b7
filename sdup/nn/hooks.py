"""Read and edit attention, layer by layer, by name.

    names = attention_layers(model)                 # {"unet.up.0.attn.0.blocks.0.attn2": module, ...}

    def fn(name, q, k, v, probs):                   # q (B, H, Nq, D), k / v (B, H, Nk, D), probs fp32 (B, H, Nq, Nk)
        maps[name] = probs.detach().cpu()           # read: return None
        return probs * keep                         # edit: new probabilities, same shape
        # or: return AttentionOutput(out)           # replace the output, (B, H, Nq, Dv), before heads merge / out_proj

    with attention_hooks(model, {"unet.*.attn2": fn}):
        res = finish(job, sample(job))

``model``: a ``LoadedModel`` (names start with its component: ``unet.``, ``vae.``, ``struct_encoder.``) or any
``nn.Module`` (names as its own ``named_modules()``).  The names are the module tree of docs/keymaps (the sdup
column, less the parameter): LDM UNets (SD 1.x, x4, StableSR) ``unet.{down,up}.<level>.attn.<i>.blocks.<j>.attn1``
(self-attention; cross-attention in models with ``disable_self_attn``) and ``.attn2`` (cross-attention to the text,
Nk = 77 tokens), ``unet.mid.attn.blocks.<j>.attn1/2``; the x2 K-UNet ``unet.{down,up}.<level>.blocks.<i>.self_attn``
/ ``.cross_attn`` (the padding tokens of the text get a -10000 bias: their probabilities are ~0); the VAEs
``vae.{encoder,decoder}.mid.attn`` (one head over all H·W positions); StableSR's time-aware encoder
``struct_encoder.levels.<b>.attn.<i>`` and ``struct_encoder.mid.attn``.  The text encoders use open_clip's
``nn.MultiheadAttention``: not hookable here (use ``register_forward_hook`` on them).

Patterns are ``fnmatch`` globs over the whole name (``*`` also matches dots, ``[12]`` one character of a set); a
pattern that matches no layer raises a ValueError listing the nearest names.  A layer matched by several patterns,
or by nested ``attention_hooks`` contexts, runs its hooks in the order they were given (outer context first): each
gets the probabilities the previous one returned; an ``AttentionOutput`` ends the chain.

What runs: a hooked layer computes its logits and softmax in fp32 (``attention_probs``), calls the hooks, then
``probs @ v`` (the ``"math"`` backend, bit for bit when every hook returns None), whatever backend is selected; every
other layer keeps the selected backend, so a run without hooks (or with an empty mapping) is unchanged bit for bit.
A hook is called once per call of its layer: with classifier-free guidance the batch is [uncond, cond]; under
``tiling.TiledModel`` once per latent tile (q holds that tile's tokens); the VAE mid block runs on the whole map even
in ``tiled_decode`` / ``tiled_encode``, and hooked there it materialises all (H·W)² probabilities, not chunks.
Hooks run inside autograd: an edit made of differentiable operations passes gradients on.
"""
from __future__ import annotations

import contextlib
import difflib
import fnmatch
from typing import Callable, Mapping

from torch import nn

from .attention import ATTENTION_LAYER_TYPES, AttentionOutput, _hooks

__all__ = ["attention_layers", "attention_hooks", "match_layers", "AttentionOutput"]
Hook = Callable  # fn(name, q, k, v, probs) -> None | probs | AttentionOutput


def _roots(model) -> dict[str, nn.Module]:
    """{prefix: module} of a LoadedModel's components ("unet." ...) or {"": model} for a module."""
    if isinstance(model, nn.Module):
        return {"": model}
    if hasattr(model, "components"):
        return {f"{comp}.": module for comp, module in model.components().items()}
    raise TypeError(f"expected a LoadedModel or an nn.Module, got {type(model).__name__}")


def attention_layers(model) -> dict[str, nn.Module]:
    """Every layer that runs ``sdup.nn.attention`` in ``model``, by name, in module-tree order (see module doc)."""
    types = tuple(ATTENTION_LAYER_TYPES)
    return {prefix + name: m for prefix, root in _roots(model).items() for name, m in root.named_modules()
            if isinstance(m, types)}


def match_layers(model, pattern: str) -> dict[str, nn.Module]:
    """The attention layers whose names match the glob ``pattern``; ValueError naming the nearest if none do."""
    layers = attention_layers(model)
    found = {name: m for name, m in layers.items() if fnmatch.fnmatchcase(name, pattern)}
    if not found:
        near = difflib.get_close_matches(pattern.replace("*", ""), list(layers), n=6, cutoff=0.0)
        raise ValueError(f"no attention layer matches {pattern!r}; nearest: {', '.join(near) or 'none (no layers)'} "
                         f"({len(layers)} layers, all listed by sdup.nn.hooks.attention_layers(model))")
    return found


@contextlib.contextmanager
def attention_hooks(model, hooks: Mapping[str, Hook]):
    """Attach ``fn(name, q, k, v, probs)`` to the attention layers of ``model`` matching each pattern of ``hooks``
    while the context is open (see the module docstring for what ``fn`` may return)."""
    attached = []  # (module, entry): exactly what this context added, removed on exit
    for pattern, fn in hooks.items():
        if not callable(fn):
            raise TypeError(f"the hook for {pattern!r} is a {type(fn).__name__}, not a callable")
        for name, module in match_layers(model, pattern).items():
            attached.append((module, (name, fn)))
    try:
        for module, entry in attached:
            _hooks.setdefault(module, []).append(entry)
        yield
    finally:
        for module, entry in attached:
            entries = _hooks.get(module, [])
            if entry in entries:
                entries.remove(entry)
            if not entries:
                _hooks.pop(module, None)
