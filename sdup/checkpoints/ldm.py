"""Original single-file layout (CompVis / Stability-AI / StableSR LDM checkpoints) <-> sdup names.

Top level of an LDM ``state_dict``:

    model.diffusion_model.*     UNet (openaimodel)             -> sdup ``unet.*``
    first_stage_model.*         AutoencoderKL                  -> sdup ``vae.*``
    cond_stage_model.transformer.*   HF CLIPTextModel (SD1)    -> sdup ``text_encoder.*``
    cond_stage_model.model.*    open_clip text tower (SD2/x4/StableSR) -> sdup ``text_encoder.*``
    structcond_stage_model.*    StableSR time-aware encoder    -> sdup ``struct_encoder.*``
    betas, alphas_cumprod, ... , low_scale_model.*, model_ema.decay/num_updates: schedule / EMA
    book-keeping, dropped on purpose (recomputed from the config; see ``IGNORED_BUFFERS``).

The UNet and VAE tables below are generated from the config (block indices depend on it) but are
plain (sdup_prefix, ldm_prefix) pairs: print ``unet_rules(cfg)`` to read them.
"""
from __future__ import annotations

import re

from ..models.unet import UNetConfig
from ..models.vae import VAEConfig
from .keymap import CONV1X1, KeyMap

SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
LOW_SCALE_BUFFERS = tuple(f"low_scale_model.{k}" for k in SCHEDULE_BUFFERS[:8])  # x4 noise augmentation
EMA_SCALARS = ("model_ema.decay", "model_ema.num_updates")
IGNORED_BUFFERS = frozenset(SCHEDULE_BUFFERS + LOW_SCALE_BUFFERS + EMA_SCALARS)

COMPONENT_PREFIXES = {  # ldm prefix -> sdup component
    "model.diffusion_model.": "unet",
    "first_stage_model.": "vae",
    "cond_stage_model.transformer.": "text_encoder",
    "cond_stage_model.model.": "text_encoder",
    "structcond_stage_model.": "struct_encoder",
}

# Inner tables: sdup sub-name -> ldm sub-name, inside one block.
RESBLOCK = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "skip": "skip_connection", "feature_mod": "spade",
            # StableSR's SFT layer (``SPADE``) in the per-resolution conditioning hook
            "feature_mod.norm": "spade.param_free_norm", "feature_mod.shared.0": "spade.mlp_shared.0",
            "feature_mod.to_gamma": "spade.mlp_gamma", "feature_mod.to_beta": "spade.mlp_beta"}
ATTENTION = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out.0"}
FEED_FORWARD = {"ff.proj_in": "ff.net.0.proj", "ff.proj_out": "ff.net.2"}
VAE_RESBLOCK = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "skip": "nin_shortcut"}
VAE_ATTENTION = {"norm": "norm", "q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "proj_out"}


def nest(outer_sdup: str, outer_ext: str, inner: dict[str, str]) -> list[tuple[str, str]]:
    """Prefix an inner table with one block's location on both sides."""
    return [(f"{outer_sdup}.{s}", f"{outer_ext}.{e}") for s, e in inner.items()]


def transformer_rules(sdup: str, ldm: str, depth: int) -> list[tuple[str, str]]:
    rules = [(sdup, ldm)]  # norm, proj_in, proj_out keep their names
    for k in range(depth):
        blk_s, blk_e = f"{sdup}.blocks.{k}", f"{ldm}.transformer_blocks.{k}"
        rules.append((blk_s, blk_e))  # norm1..3 keep their names
        for a in ("attn1", "attn2"):
            rules += nest(f"{blk_s}.{a}", f"{blk_e}.{a}", ATTENTION)
        rules += nest(blk_s, blk_e, FEED_FORWARD)
    return rules


def unet_rules(cfg: UNetConfig) -> list[tuple[str, str]]:
    L, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    has_attn = [2 ** b in cfg.attention_resolutions for b in range(levels)]
    rules = [("time_embed.fc1", "time_embed.0"), ("time_embed.fc2", "time_embed.2"), ("class_embed", "label_emb"),
             ("conv_in", "input_blocks.0.0"), ("norm_out", "out.0"), ("conv_out", "out.2")]

    def res(sdup, ldm):
        rules.extend([(sdup, ldm)] + nest(sdup, ldm, RESBLOCK))

    def attn(sdup, ldm):
        rules.extend(transformer_rules(sdup, ldm, cfg.transformer_depth))

    for b in range(levels):
        for l in range(L):
            i = 1 + b * (L + 1) + l
            res(f"down.{b}.res.{l}", f"input_blocks.{i}.0")
            if has_attn[b]:
                attn(f"down.{b}.attn.{l}", f"input_blocks.{i}.1")
        if b != levels - 1:
            rules.append((f"down.{b}.downsample.conv", f"input_blocks.{1 + b * (L + 1) + L}.0.op"))
    res("mid.res1", "middle_block.0")
    attn("mid.attn", "middle_block.1")
    res("mid.res2", "middle_block.2")
    for j in range(levels):  # j = 0 is the deepest level
        level_attn = has_attn[levels - 1 - j]
        for l in range(L + 1):
            i = j * (L + 1) + l
            res(f"up.{j}.res.{l}", f"output_blocks.{i}.0")
            if level_attn:
                attn(f"up.{j}.attn.{l}", f"output_blocks.{i}.1")
        if j != levels - 1:
            rules.append((f"up.{j}.upsample.conv", f"output_blocks.{j * (L + 1) + L}.{2 if level_attn else 1}.conv"))
    return rules


def unet_keymap(cfg: UNetConfig, sdup_keys) -> KeyMap:
    """SD1 stores proj_in/proj_out as 1x1 convs; SD2/x4/StableSR as Linear (``use_linear_in_transformer``)."""
    ops = {} if cfg.use_linear_in_transformer else {
        k: CONV1X1 for k in sdup_keys if re.search(r"attn(\.\d+)?\.proj_(in|out)\.weight$", k)}
    return KeyMap.from_rules(sdup_keys, unet_rules(cfg), ops)


def vae_rules(cfg: VAEConfig) -> list[tuple[str, str]]:
    n = len(cfg.ch_mult)
    rules = [("", "")]  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv, *.downsample.conv, *.upsample.conv
    for part in ("encoder", "decoder"):
        for mid_s, mid_e in (("res1", "block_1"), ("res2", "block_2")):
            rules += nest(f"{part}.mid.{mid_s}", f"{part}.mid.{mid_e}", VAE_RESBLOCK)
        rules += nest(f"{part}.mid.attn", f"{part}.mid.attn_1", VAE_ATTENTION)
    for i in range(n):
        for j in range(cfg.num_res_blocks):
            rules += nest(f"encoder.down.{i}.res.{j}", f"encoder.down.{i}.block.{j}", VAE_RESBLOCK)
        rules.append((f"decoder.up.{i}", f"decoder.up.{n - 1 - i}"))  # ldm indexes decoder levels by resolution
        for j in range(cfg.num_res_blocks + 1):
            rules += nest(f"decoder.up.{i}.res.{j}", f"decoder.up.{n - 1 - i}.block.{j}", VAE_RESBLOCK)
    return rules


def vae_keymap(cfg: VAEConfig, sdup_keys) -> KeyMap:
    ops = {k: CONV1X1 for k in sdup_keys if ".mid.attn." in k and k.endswith("proj.weight")}
    return KeyMap.from_rules(sdup_keys, vae_rules(cfg), ops)


def split_components(sd: dict) -> dict[str, dict]:
    """Split a flat LDM state dict by component prefix; unknown top-level keys go to ``"other"``."""
    parts: dict[str, dict] = {"other": {}}
    for k, v in sd.items():
        for prefix, comp in COMPONENT_PREFIXES.items():
            if k.startswith(prefix):
                parts.setdefault(comp, {})[k[len(prefix):]] = v
                break
        else:
            parts["other"][k] = v
    return parts


def ema_key(unet_key_ldm: str) -> str:
    """``model.diffusion_model.input_blocks.0.0.weight`` -> ``model_ema.diffusion_modelinput_blocks00weight``
    (LitEma removes every dot; map from the model-side names, never by parsing the EMA names)."""
    return "model_ema." + ("diffusion_model." + unet_key_ldm).replace(".", "")
