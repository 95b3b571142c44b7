"""diffusers ``UNet2DConditionModel`` with K-blocks (stabilityai/sd-x2-latent-upscaler ``unet/``) <-> sdup ``KUNet``.

All tensors keep their shapes (the attention projections are Linear with bias on both sides), so the
table is only prefix renames (SPEC §4.3/4.4):

    time_features                 time_proj                      (F/2,)
    mapping.cond_proj / fc1 / fc2 time_embedding.cond_proj / linear_1 / linear_2
    proj_in / proj_out            conv_in / conv_out
    down.{b}.blocks.{j}.res       down_blocks.{b}.resnets.{j}    norm1/norm2.to_scale_shift -> norm1/norm2.linear,
                                                                 conv1, conv2, skip -> conv_shortcut
    down.{b}.blocks.{j}.self_attn  down_blocks.{b}.attentions.{j}: norm.to_scale_shift -> norm1.linear,
                                  {q,k,v,out}_proj -> attn1.{to_q,to_k,to_v,to_out.0}
    down.{b}.blocks.{j}.cross_attn down_blocks.{b}.attentions.{j}: norm.to_scale_shift -> norm2.linear,
                                  text_norm -> attn2.norm_cross, {q,k,v,out}_proj -> attn2.{...}
    up.{u}.…                      up_blocks.{u}.…  (same index: both count from the deepest level)

The resampling kernels are non-persistent on both sides. ``noise_aug_features`` (the low-res noise-level
weights that only the k-diffusion file ships) has no diffusers slot: it is left out of this table, so
exporting a model loaded from the original file drops it (diffusers hard-codes noise level 0).
"""
from __future__ import annotations

from ..models.latent_upscaler import KUNetConfig, kunet_state_keys
from .keymap import KeyMap

RESBLOCK = {"norm1.to_scale_shift": "norm1.linear", "norm2.to_scale_shift": "norm2.linear", "conv1": "conv1",
            "conv2": "conv2", "skip": "conv_shortcut"}
SELF_ATTENTION = {"norm.to_scale_shift": "norm1.linear", "q_proj": "attn1.to_q", "k_proj": "attn1.to_k",
                  "v_proj": "attn1.to_v", "out_proj": "attn1.to_out.0"}
CROSS_ATTENTION = {"norm.to_scale_shift": "norm2.linear", "text_norm": "attn2.norm_cross", "q_proj": "attn2.to_q",
                   "k_proj": "attn2.to_k", "v_proj": "attn2.to_v", "out_proj": "attn2.to_out.0"}


def _nest(sdup: str, ext: str, inner: dict[str, str]) -> list[tuple[str, str]]:
    return [(f"{sdup}.{s}", f"{ext}.{e}") for s, e in inner.items()]


def kunet_diffusers_rules(cfg: KUNetConfig) -> list[tuple[str, str]]:
    """(sdup_prefix, diffusers_prefix) pairs for every block of ``cfg``."""
    rules = [("time_features", "time_proj"), ("mapping.cond_proj", "time_embedding.cond_proj"),
             ("mapping.fc1", "time_embedding.linear_1"), ("mapping.fc2", "time_embedding.linear_2"),
             ("proj_in", "conv_in"), ("proj_out", "conv_out")]
    n = len(cfg.channels)
    for side, ext_side in (("down", "down_blocks"), ("up", "up_blocks")):
        for s in range(n):
            level = s if side == "down" else n - 1 - s
            for j in range(cfg.depths[level]):
                blk = f"{side}.{s}.blocks.{j}"
                rules += _nest(f"{blk}.res", f"{ext_side}.{s}.resnets.{j}", RESBLOCK)
                rules += _nest(f"{blk}.self_attn", f"{ext_side}.{s}.attentions.{j}", SELF_ATTENTION)
                rules += _nest(f"{blk}.cross_attn", f"{ext_side}.{s}.attentions.{j}", CROSS_ATTENTION)
    return rules


def kunet_diffusers_keymap(cfg: KUNetConfig) -> KeyMap:
    for level, (self_attn, cross) in enumerate(zip(cfg.self_attn_depths, cfg.cross_attn_depths)):
        if self_attn and not cross:
            raise ValueError(f"level {level}: self-attention without cross-attention has no diffusers K-block")
    keys = [k for k in kunet_state_keys(cfg) if not k.startswith("noise_aug_features.")]
    return KeyMap.from_rules(keys, kunet_diffusers_rules(cfg))
