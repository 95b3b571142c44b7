"""diffusers folder layout (``unet/``, ``vae/``, ``text_encoder/``) <-> sdup names, and folder configs."""
from __future__ import annotations

import functools
from typing import Sequence

from ..models.latent_upscaler import KUNetConfig, kunet_state_keys, split_io_channels
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig
from . import ldm
from .keymap import KeyMap
from .ldm import ATTENTION, nest, transformer_rules  # the transformer blocks are named alike in both layouts

RESBLOCK = {"norm1": "norm1", "conv1": "conv1", "time_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
            "skip": "conv_shortcut", "feature_mod": "spade"}
VAE_ATTENTION = {"norm": "group_norm", **ATTENTION}


def unet_rules(cfg: UNetConfig) -> list[tuple[str, str]]:
    L, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    rules = [("time_embed.fc1", "time_embedding.linear_1"), ("time_embed.fc2", "time_embedding.linear_2"),
             ("class_embed", "class_embedding"), ("conv_in", "conv_in"), ("norm_out", "conv_norm_out"),
             ("conv_out", "conv_out")]
    for side, ext_side, n_res, resampler, ext_resampler in (("down", "down_blocks", L, "downsample", "downsamplers"),
                                                            ("up", "up_blocks", L + 1, "upsample", "upsamplers")):
        for b in range(levels):
            for l in range(n_res):
                rules += [(f"{side}.{b}.res.{l}", f"{ext_side}.{b}.resnets.{l}")]
                rules += nest(f"{side}.{b}.res.{l}", f"{ext_side}.{b}.resnets.{l}", RESBLOCK)
                rules += transformer_rules(f"{side}.{b}.attn.{l}", f"{ext_side}.{b}.attentions.{l}", cfg.transformer_depth)
            rules.append((f"{side}.{b}.{resampler}.conv", f"{ext_side}.{b}.{ext_resampler}.0.conv"))
    for s, e in (("mid.res1", "mid_block.resnets.0"), ("mid.res2", "mid_block.resnets.1")):
        rules += [(s, e)] + nest(s, e, RESBLOCK)
    rules += transformer_rules("mid.attn", "mid_block.attentions.0", cfg.transformer_depth)
    return rules


unet_keymap = functools.partial(ldm.unet_keymap, rules=unet_rules)  # (cfg, sdup_keys) -> KeyMap, diffusers names


def vae_rules(cfg: VAEConfig) -> list[tuple[str, str]]:
    rules = [("", ""), ("encoder.norm_out", "encoder.conv_norm_out"), ("decoder.norm_out", "decoder.conv_norm_out")]
    for part in ("encoder", "decoder"):
        for s, e in (("mid.res1", "mid_block.resnets.0"), ("mid.res2", "mid_block.resnets.1")):
            rules += [(f"{part}.{s}", f"{part}.{e}"), (f"{part}.{s}.skip", f"{part}.{e}.conv_shortcut")]
        rules += nest(f"{part}.mid.attn", f"{part}.mid_block.attentions.0", VAE_ATTENTION)
    for i in range(len(cfg.ch_mult)):
        for s, e in ((f"encoder.down.{i}", f"encoder.down_blocks.{i}"), (f"decoder.up.{i}", f"decoder.up_blocks.{i}")):
            rules.append((f"{s}.res", f"{e}.resnets"))
            for j in range(cfg.num_res_blocks + 1):
                rules.append((f"{s}.res.{j}.skip", f"{e}.resnets.{j}.conv_shortcut"))
        rules.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
        rules.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv"))
    return rules


def vae_keymap(cfg: VAEConfig, sdup_keys) -> KeyMap:
    return KeyMap.from_rules(sdup_keys, vae_rules(cfg))


def unet_config(cfg: dict) -> UNetConfig:
    """diffusers ``unet/config.json`` (SD-type blocks) -> UNetConfig."""
    boc = list(cfg["block_out_channels"])
    C = boc[0]
    if any(c % C for c in boc):
        raise ValueError(f"block_out_channels {boc} are not multiples of the first level")
    downs = list(cfg["down_block_types"])
    if any(t.startswith("K") for t in downs):
        raise ValueError("this is a K-UNet (sd-x2-latent-upscaler), not an LDM UNet")
    levels = len(boc)
    heads = cfg.get("attention_head_dim", 8)  # legacy name: the number of heads for SD-type blocks
    if cfg.get("num_attention_heads") is not None:
        heads = cfg["num_attention_heads"]
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
    dims = {boc[b] // heads[b] for b in range(levels)}
    head_kw = {"num_heads": heads[0]} if len(set(heads)) == 1 else {"num_head_channels": dims.pop()}
    if len(set(heads)) != 1 and dims:
        raise ValueError(f"per-level heads {heads} with varying head dims are not supported")
    only_cross = cfg.get("only_cross_attention", False)
    only_cross = list(only_cross) if isinstance(only_cross, (list, tuple)) else [only_cross] * levels
    depth = cfg.get("transformer_layers_per_block", 1)
    if isinstance(depth, (list, tuple)):
        if len(set(depth)) != 1:
            raise ValueError(f"per-level transformer depth {depth} is not supported")
        depth = depth[0]
    cross = cfg.get("cross_attention_dim", 768)
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4), model_channels=C,
        channel_mult=tuple(c // C for c in boc), num_res_blocks=cfg.get("layers_per_block", 2),
        attention_resolutions=tuple(2 ** b for b, t in enumerate(downs) if "CrossAttn" in t),
        context_dim=cross[0] if isinstance(cross, (list, tuple)) else cross, transformer_depth=depth,
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
        disable_self_attentions=tuple(only_cross) if any(only_cross) else None,
        disable_middle_self_attn=bool(cfg.get("mid_block_only_cross_attention") or False),
        num_classes=cfg.get("num_class_embeds"), **head_kw)


def vae_config(cfg: dict) -> VAEConfig:
    boc = list(cfg["block_out_channels"])
    return VAEConfig(ch=boc[0], ch_mult=tuple(c // boc[0] for c in boc), num_res_blocks=cfg.get("layers_per_block", 2),
                     z_channels=cfg.get("latent_channels", 4), embed_dim=cfg.get("latent_channels", 4),
                     in_channels=cfg.get("in_channels", 3), out_ch=cfg.get("out_channels", 3))


# --------------------------------------------------------------------------------------------------
# diffusers ``UNet2DConditionModel`` with K-blocks (stabilityai/sd-x2-latent-upscaler ``unet/``) <-> sdup ``KUNet``.
#
# All tensors keep their shapes (the attention projections are Linear with bias on both sides), so the
# table is only prefix renames:
#
#     time_features                 time_proj                      (F/2,)
#     mapping.cond_proj / fc1 / fc2 time_embedding.cond_proj / linear_1 / linear_2
#     proj_in / proj_out            conv_in / conv_out
#     down.{b}.blocks.{j}.res       down_blocks.{b}.resnets.{j}    norm1/norm2.to_scale_shift -> norm1/norm2.linear,
#                                                                  conv1, conv2, skip -> conv_shortcut
#     down.{b}.blocks.{j}.self_attn  down_blocks.{b}.attentions.{j}: norm.to_scale_shift -> norm1.linear,
#                                   {q,k,v,out}_proj -> attn1.{to_q,to_k,to_v,to_out.0}
#     down.{b}.blocks.{j}.cross_attn down_blocks.{b}.attentions.{j}: norm.to_scale_shift -> norm2.linear,
#                                   text_norm -> attn2.norm_cross, {q,k,v,out}_proj -> attn2.{...}
#     up.{u}.…                      up_blocks.{u}.…  (same index: both count from the deepest level)
#
# The resampling kernels are non-persistent on both sides. ``noise_aug_features`` (the low-res noise-level
# weights that only the k-diffusion file ships) has no diffusers slot: it is left out of this table, so
# exporting a model loaded from the original file drops it (diffusers hard-codes noise level 0).

K_RESBLOCK = {"norm1.to_scale_shift": "norm1.linear", "norm2.to_scale_shift": "norm2.linear", "conv1": "conv1",
            "conv2": "conv2", "skip": "conv_shortcut"}
K_SELF_ATTENTION = {"norm.to_scale_shift": "norm1.linear", "q_proj": "attn1.to_q", "k_proj": "attn1.to_k",
                  "v_proj": "attn1.to_v", "out_proj": "attn1.to_out.0"}
K_CROSS_ATTENTION = {"norm.to_scale_shift": "norm2.linear", "text_norm": "attn2.norm_cross", "q_proj": "attn2.to_q",
                   "k_proj": "attn2.to_k", "v_proj": "attn2.to_v", "out_proj": "attn2.to_out.0"}


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
                rules += nest(f"{blk}.res", f"{ext_side}.{s}.resnets.{j}", K_RESBLOCK)
                rules += nest(f"{blk}.self_attn", f"{ext_side}.{s}.attentions.{j}", K_SELF_ATTENTION)
                rules += nest(f"{blk}.cross_attn", f"{ext_side}.{s}.attentions.{j}", K_CROSS_ATTENTION)
    return rules


def kunet_diffusers_keymap(cfg: KUNetConfig) -> KeyMap:
    for level, (self_attn, cross) in enumerate(zip(cfg.self_attn_depths, cfg.cross_attn_depths)):
        if self_attn and not cross:
            raise ValueError(f"level {level}: self-attention without cross-attention has no diffusers K-block")
    keys = [k for k in kunet_state_keys(cfg) if not k.startswith("noise_aug_features.")]
    return KeyMap.from_rules(keys, kunet_diffusers_rules(cfg))


# the K-UNet's unet/config.json <-> KUNetConfig

def kunet_config(config: dict) -> KUNetConfig:
    """From a diffusers ``unet/config.json`` of a K-block ``UNet2DConditionModel``.

    diffusers derives the self-attention placement from channel widths (down: the last level;
    up: levels whose width equals the next-shallower width and the time-embedding width), so only
    configs where that agrees with one self-attention flag per level are accepted."""
    downs, ups = list(config["down_block_types"]), list(config["up_block_types"])
    if not all(t in ("KDownBlock2D", "KCrossAttnDownBlock2D") for t in downs) or \
            not all(t in ("KUpBlock2D", "KCrossAttnUpBlock2D") for t in ups):
        raise ValueError(f"not a K-UNet: down {downs}, up {ups}")
    for key, want in (("time_embedding_type", "fourier"), ("mid_block_type", None), ("conv_in_kernel", 1),
                      ("conv_out_kernel", 1), ("act_fn", "gelu"), ("timestep_post_act", "gelu")):
        if config.get(key, want) != want:
            raise ValueError(f"K-UNet config: {key} = {config.get(key)!r}, expected {want!r}")
    if config.get("flip_sin_to_cos", True) is not True:
        raise ValueError("K-UNet config: flip_sin_to_cos must be true (cos first)")
    boc = list(config["block_out_channels"])
    n = len(boc)
    lpb = config.get("layers_per_block", 2)
    depths = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n
    cross = ["CrossAttn" in t for t in downs]
    if cross != ["CrossAttn" in t for t in reversed(ups)]:
        raise ValueError(f"down/up block types disagree on cross-attention: {downs} / {ups}")
    head_dim = config.get("attention_head_dim", 64)
    if isinstance(head_dim, (list, tuple)):
        if len(set(head_dim)) != 1:
            raise ValueError(f"per-level attention_head_dim {head_dim} is not supported")
        head_dim = head_dim[0]
    mapping_out = config.get("time_embedding_dim") or 2 * boc[0]
    self_attn = kunet_self_attention(boc, cross, mapping_out)
    in_ch, out_ch = config.get("in_channels", 8), config.get("out_channels", 5)
    input_channels, unet_cond, has_var = split_io_channels(in_ch, out_ch)
    cross_dim = config.get("cross_attention_dim", 768)
    if isinstance(cross_dim, (list, tuple)):
        cross_dim = cross_dim[0]
    return KUNetConfig(input_channels=input_channels, unet_cond_channels=unet_cond, channels=boc, depths=depths,
                       self_attn_depths=self_attn, cross_attn_depths=cross, mapping_out=mapping_out,
                       mapping_cond_dim=config.get("time_cond_proj_dim") or 0,
                       cross_cond_dim=cross_dim if any(cross) else 0, head_dim=head_dim, has_variance=has_var)


def kunet_self_attention(channels: Sequence[int], cross: Sequence[bool], temb_dim: int) -> tuple[bool, ...]:
    """Per-level self-attention of a diffusers K-UNet, checked to be one flag per level (what the
    k-diffusion model has): the deepest level only, and it must have cross-attention."""
    n = len(channels)
    down = [cross[b] and b == n - 1 for b in range(n)]                    # KCrossAttnDownBlock2D without downsampler
    up = [cross[b] and channels[b] == channels[max(b - 1, 0)] == temb_dim  # KCrossAttnUpBlock2D "is_first_block"
          for b in range(n)]
    if down != up or not down[n - 1]:
        raise ValueError(f"diffusers K-UNet with channels {list(channels)}, cross-attention {list(cross)} and time "
                         f"embedding width {temb_dim} places self-attention down {down} / up {up}: not representable "
                         "(diffusers needs the deepest level to have cross-attention and width == 2 * channels[0])")
    return tuple(down)


def kunet_diffusers_config(cfg: KUNetConfig) -> dict:
    """The diffusers ``unet/config.json`` equivalent to ``cfg`` (raises if diffusers cannot express it).
    ``noise_aug_embed`` has no diffusers counterpart and is not written."""
    if cfg.self_attn_depths != kunet_self_attention(cfg.channels, cfg.cross_attn_depths, cfg.mapping_out):
        raise ValueError(f"self_attn_depths {cfg.self_attn_depths} cannot be expressed by diffusers' K-blocks")
    if cfg.group_size != 32:
        raise ValueError("diffusers K-blocks hard-code GroupNorm groups of 32 channels")
    if any(c < cfg.group_size for c in cfg.channels):
        raise ValueError("diffusers K-blocks need every width >= 32 (they use channels // 32 groups without a floor)")
    depths = list(cfg.depths)
    out = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": cfg.input_channels + cfg.unet_cond_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["KCrossAttnDownBlock2D" if c else "KDownBlock2D" for c in cfg.cross_attn_depths],
        "mid_block_type": None,
        "up_block_types": ["KCrossAttnUpBlock2D" if c else "KUpBlock2D" for c in reversed(cfg.cross_attn_depths)],
        "block_out_channels": list(cfg.channels),
        "layers_per_block": depths[0] if len(set(depths)) == 1 else depths,
        "act_fn": "gelu",
        "norm_num_groups": None,
        "norm_eps": 1e-5,
        "cross_attention_dim": cfg.cross_cond_dim or 768,
        "attention_head_dim": cfg.head_dim,
        "time_cond_proj_dim": cfg.mapping_cond_dim or None,
        "resnet_time_scale_shift": "scale_shift",
        "time_embedding_type": "fourier",
        "timestep_post_act": "gelu",
        "flip_sin_to_cos": True,
        "conv_in_kernel": 1,
        "conv_out_kernel": 1,
        "only_cross_attention": False,
        "sample_size": None,
    }
    if cfg.mapping_out != 2 * cfg.channels[0]:
        out["time_embedding_dim"] = cfg.mapping_out
    return out
