"""Text-encoder checkpoint layouts <-> sdup names (``sdup.models.text.TextEncoder`` = open_clip's names).

Two external layouts:

* **HF ``CLIPTextModel``** with the ``text_model.`` prefix, as written by transformers 4.x: diffusers
  ``text_encoder/`` folders (SD1, x2, x4) and, under ``cond_stage_model.transformer.``, SD1's ``sd-v1-4.ckpt``.
  The fused open_clip ``attn.in_proj_{weight,bias}`` = cat([q_proj, k_proj, v_proj], dim 0).
  (transformers >= 5 ``state_dict()`` has no ``text_model.`` prefix: add it before using this map.)
* **original open_clip**, as stored under ``cond_stage_model.model.`` in SD2 / x4 / StableSR files: identical to the
  sdup names, plus tensors present but unused by the penultimate path (see ``openclip_ignorable``).

Which ``TextConfig`` to use:

    sd-v1-4.ckpt / SD1 + x2 diffusers text_encoder/   CLIP_VIT_L14       (HF layout, 12 layers, quick_gelu)
    x4 / StableSR / SD2 original files                OPENCLIP_VIT_H14   (open_clip layout, 24 blocks, 23 built)
    x4 / SD2 diffusers text_encoder/                  OPENCLIP_VIT_H14   (HF layout, 23 layers, gelu)

The diffusers x4 text encoder is OpenCLIP-H with the unused last block already dropped; its 23 layers +
``final_layer_norm`` are exactly sdup's 23 built blocks + ``ln_final``, so the same config -- and the same
module -- serves both files. ``hf_clip_keymap`` maps the ``cfg.layers`` built blocks one to one and ignores
``cfg.output`` (an HF file holds only the layers that are used); ``cfg.output`` matters only for the original
open_clip layout (which block is present but skipped), and ``cfg.pad_token_id`` only for the tokenizer (0 for
the OpenCLIP family, also with HF weights: diffusers' SD2 tokenizers pad with "!" = 0).

Usage by a whole-checkpoint loader (keys relative to a component; add prefixes on both sides)::

    km = hf_clip_keymap(cfg).with_prefix("text_encoder.", "cond_stage_model.transformer.")
    ignore = hf_clip_ignorable("cond_stage_model.transformer.")
    sd = km.to_sdup(ckpt, ignore=lambda k: k in ignore or ...)
"""
from __future__ import annotations

from ..models.text import TextConfig, text_encoder_keys
from .keymap import FUSE, Entry, KeyMap

# Inside one block: sdup (open_clip) sub-name -> HF CLIPEncoderLayer sub-name. in_proj is FUSEd separately.
HF_BLOCK = {"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
            "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}

# Present in transformers-4.x files (a constant arange(77), int64 or float), dropped on purpose; not required.
HF_CLIP_IGNORABLE = frozenset({"text_model.embeddings.position_ids"})


def hf_clip_ignorable(prefix: str = "") -> frozenset[str]:
    return frozenset(prefix + k for k in HF_CLIP_IGNORABLE)


def hf_clip_rules(cfg: TextConfig) -> list[tuple[str, str]]:
    rules = [("token_embedding", "text_model.embeddings.token_embedding"),
             ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
             ("ln_final", "text_model.final_layer_norm")]
    for i in range(cfg.layers):
        blk_s, blk_e = f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}"
        rules += [(f"{blk_s}.{s}", f"{blk_e}.{e}") for s, e in HF_BLOCK.items()]
    return rules


def hf_clip_keymap(cfg: TextConfig) -> KeyMap:
    """sdup ``TextEncoder(cfg)`` <-> HF ``CLIPTextModel`` with ``text_model.`` prefix (``cfg.layers`` HF layers)."""
    fused = []
    for i in range(cfg.layers):
        blk_s, blk_e = f"transformer.resblocks.{i}.attn", f"text_model.encoder.layers.{i}.self_attn"
        for param in ("weight", "bias"):  # in_proj rows [0:W] = q, [W:2W] = k, [2W:3W] = v
            fused.append(Entry((f"{blk_s}.in_proj_{param}",), tuple(f"{blk_e}.{p}_proj.{param}" for p in "qkv"), FUSE))
    return KeyMap.from_rules(text_encoder_keys(cfg), hf_clip_rules(cfg), explicit=fused)


def openclip_keymap(cfg: TextConfig) -> KeyMap:
    """sdup ``TextEncoder(cfg)`` <-> original open_clip text tower names (without ``cond_stage_model.model.``):
    the identity on the built blocks."""
    return KeyMap.from_rules(text_encoder_keys(cfg), [("", "")])


def openclip_ignorable(cfg: TextConfig, prefix: str = "") -> frozenset[str]:
    """Keys of an original open_clip text tower that are present but unused: ``text_projection``,
    ``logit_scale`` and, for ``output="penultimate"``, every tensor of the one unbuilt block
    ``transformer.resblocks.{cfg.layers}`` (exact names, no wildcard)."""
    keys = {"text_projection", "logit_scale"}
    if cfg.output == "penultimate":
        block0 = "transformer.resblocks.0."
        keys |= {f"transformer.resblocks.{cfg.layers}.{k[len(block0):]}"
                 for k in text_encoder_keys(cfg) if k.startswith(block0)}
    return frozenset(prefix + k for k in keys)
