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

from ..models.stablesr import CFWConfig, TimeAwareEncoderConfig
from ..models.unet import UNetConfig
from ..models.vae import VAEConfig
from .detect import vae_config_from_shapes
from .keymap import CONV1D, CONV1X1, KeyMap

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


# --------------------------------------------------------------------------------------------------
# StableSR's original single-file layouts <-> sdup names (companion of ``ldm.py``).
#
# * The UNet with SFT layers needs nothing new: ``ldm.unet_keymap`` already maps the ResBlock hook
#   ``feature_mod.{norm, shared.0, to_gamma, to_beta}`` <-> ``spade.{param_free_norm, mlp_shared.0,
#   mlp_gamma, mlp_beta}`` (``ldm.RESBLOCK``).
# * Time-aware encoder: ``structcond_stage_model.*`` of ``stablesr_000117.ckpt`` (prefix stripped by
#   ``ldm.split_components``) <-> ``TimeAwareEncoder``:
#
#       time_embed.fc1 / fc2          time_embed.0 / time_embed.2
#       conv_in                       input_blocks.0.0
#       levels.{b}.res.{l}            input_blocks.{1 + b(L+1) + l}.0        (ResBlock names as in ldm.RESBLOCK)
#       levels.{b}.attn.{l}           input_blocks.{1 + b(L+1) + l}.1        {norm, qkv, out_proj} <- {norm, qkv, proj_out}
#       levels.{b}.downsample.conv    input_blocks.{1 + b(L+1) + L}.0.op
#       mid.res1 / attn / res2        middle_block.0 / 1 / 2
#       feature_proj.{i}              fea_tran.{i}
#
#   The attention ``qkv`` / ``proj_out`` weights are kernel-1 conv1d upstream, (o, i, 1); sdup keeps them
#   as Linear (o, i): the ``CONV1D`` op reshapes them (losslessly, both ways).
# * CFW autoencoder: the keys of ``vqgan_cfw_00011.ckpt['state_dict']`` (``encoder.*``, ``decoder.*``,
#   ``quant_conv.*``, ``post_quant_conv.*``) <-> ``CFWAutoencoder``: ``ldm.vae_rules`` plus
#
#       decoder.up.{n-1-i}.fuse.fuse_in                     decoder.fusion_layer_{i}.encode_enc_1   (skip <- conv_out)
#       decoder.up.{n-1-i}.fuse.rrdb.{k}.dense.{d}.convs.{c}  decoder.fusion_layer_{i}.encode_enc_2.{k}.rdb{d+1}.conv{c+1}
#       decoder.up.{n-1-i}.fuse.fuse_out                    decoder.fusion_layer_{i}.encode_enc_3
#
#   (ldm numbers decoder levels by resolution, i = 0 full resolution; sdup by execution order.)
#   The file also holds the training loss (``loss.*``), skipped on purpose by ``CFW_IGNORABLE``.

STRUCT_PREFIX = "structcond_stage_model."
LEGACY_ATTENTION = {"norm": "norm", "qkv": "qkv", "out_proj": "proj_out"}
FUSION_RESBLOCK = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "skip": "conv_out"}


def _shape(v) -> tuple:
    """A shape from a shape or a tensor (the *_from_shapes helpers accept state dicts too)."""
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


# ------------------------------------------------------------------------------------------------
# time-aware encoder

def struct_encoder_rules(cfg: TimeAwareEncoderConfig) -> list[tuple[str, str]]:
    L, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    rules = [("time_embed.fc1", "time_embed.0"), ("time_embed.fc2", "time_embed.2"), ("conv_in", "input_blocks.0.0")]

    def res(sdup, ldm):
        rules.extend([(sdup, ldm)] + nest(sdup, ldm, RESBLOCK))

    def attn(sdup, ldm):
        rules.extend([(sdup, ldm)] + nest(sdup, ldm, LEGACY_ATTENTION))

    for b in range(levels):
        for l in range(L):
            i = 1 + b * (L + 1) + l
            res(f"levels.{b}.res.{l}", f"input_blocks.{i}.0")
            if 2 ** b in cfg.attention_resolutions:
                attn(f"levels.{b}.attn.{l}", f"input_blocks.{i}.1")
        if b != levels - 1:
            rules.append((f"levels.{b}.downsample.conv", f"input_blocks.{1 + b * (L + 1) + L}.0.op"))
    res("mid.res1", "middle_block.0")
    attn("mid.attn", "middle_block.1")
    res("mid.res2", "middle_block.2")
    for i in range(levels):  # one collected map per downsample, plus the middle output
        res(f"feature_proj.{i}", f"fea_tran.{i}")
    return rules


def struct_encoder_keymap(cfg: TimeAwareEncoderConfig, sdup_keys) -> KeyMap:
    """``TimeAwareEncoder`` <-> ``structcond_stage_model.*`` without the prefix (``ldm.split_components``
    strips it; ``.with_prefix("", STRUCT_PREFIX)`` puts it back)."""
    sdup_keys = list(sdup_keys)
    ops = {k: CONV1D for k in sdup_keys if re.search(r"attn(\.\d+)?\.(qkv|out_proj)\.weight$", k)}
    return KeyMap.from_rules(sdup_keys, struct_encoder_rules(cfg), ops)


def struct_encoder_config_from_shapes(shapes: dict[str, tuple], num_heads: int = 4) -> TimeAwareEncoderConfig:
    """``TimeAwareEncoderConfig`` from the encoder's {key: shape} (with or without the
    ``structcond_stage_model.`` prefix). Head counts are not in the weights: ``num_heads`` (official: 4)."""
    s = {k[len(STRUCT_PREFIX):] if k.startswith(STRUCT_PREFIX) else k: _shape(v) for k, v in shapes.items()}
    C, in_ch = s["input_blocks.0.0.weight"][:2]
    levels = len({m.group(1) for k in s if (m := re.match(r"fea_tran\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in s if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    L = (len(blocks) - 1 - (levels - 1)) // levels  # conv_in + levels*L res blocks + (levels-1) downsamples
    first = [1 + b * (L + 1) for b in range(levels)]
    mult = tuple(s[f"input_blocks.{i}.0.out_layers.3.weight"][0] // C for i in first)
    attn_res = tuple(2 ** b for b, i in enumerate(first) if f"input_blocks.{i}.1.qkv.weight" in s)
    return TimeAwareEncoderConfig(in_channels=in_ch, model_channels=C, out_channels=s["fea_tran.0.out_layers.3.weight"][0],
                                  num_res_blocks=L, attention_resolutions=attn_res, channel_mult=mult,
                                  num_heads=num_heads, num_head_channels=-1)


def sft_feature_channels_from_shapes(unet_shapes: dict[str, tuple]) -> int | None:
    """Input channels of the UNet's SFT layers (256 for the released model), None if it has none."""
    k = next((k for k in unet_shapes if k.endswith("spade.mlp_shared.0.weight")), None)
    return None if k is None else _shape(unet_shapes[k])[1]


# ------------------------------------------------------------------------------------------------
# CFW autoencoder

def CFW_IGNORABLE(key: str) -> bool:
    """Keys of ``vqgan_cfw_00011.ckpt['state_dict']`` that inference skips on purpose: the training loss
    ``loss.*`` (``LPIPSWithDiscriminator``, 56 keys in the official file):

    * ``loss.logvar``
    * ``loss.perceptual_loss.scaling_layer.{shift, scale}``, ``loss.perceptual_loss.net.slice{1..5}.*``
      (LPIPS VGG16), ``loss.perceptual_loss.lin{0..4}.model.1.weight``
    * ``loss.discriminator.main.*`` (NLayerDiscriminator, incl. BatchNorm ``running_mean``, ``running_var``,
      int64 ``num_batches_tracked``)
    """
    return key.startswith("loss.")


def cfw_fusion_rules(cfg: CFWConfig) -> list[tuple[str, str]]:
    n = len(cfg.ch_mult)
    rules = []
    for i in cfg.fusion_levels():
        s, e = f"decoder.up.{n - 1 - i}.fuse", f"decoder.fusion_layer_{i}"
        rules.append((s, e))
        rules += nest(f"{s}.fuse_in", f"{e}.encode_enc_1", FUSION_RESBLOCK)
        rules += nest(f"{s}.fuse_out", f"{e}.encode_enc_3", FUSION_RESBLOCK)
        for k in range(cfg.num_fuse_block):
            for d in range(3):
                for c in range(5):
                    rules.append((f"{s}.rrdb.{k}.dense.{d}.convs.{c}", f"{e}.encode_enc_2.{k}.rdb{d + 1}.conv{c + 1}"))
    return rules


def cfw_vae_rules(cfg: CFWConfig) -> list[tuple[str, str]]:
    return vae_rules(cfg) + cfw_fusion_rules(cfg)


def cfw_vae_keymap(cfg: CFWConfig, sdup_keys) -> KeyMap:
    """``CFWAutoencoder`` <-> the keys of ``vqgan_cfw_00011.ckpt['state_dict']``. Use
    ``ignore=CFW_IGNORABLE`` in ``to_sdup`` to skip the training loss."""
    sdup_keys = list(sdup_keys)
    ops = {k: CONV1X1 for k in sdup_keys if ".mid.attn." in k and k.endswith("proj.weight")}  # as ldm.vae_keymap
    return KeyMap.from_rules(sdup_keys, cfw_vae_rules(cfg), ops)


def cfw_fusion_from_keys(keys) -> tuple[list[int], int]:
    """(resolution levels with a fusion layer, RRDBs per fusion layer) from CFW checkpoint keys."""
    levels = sorted({int(m.group(1)) for k in keys if (m := re.match(r"decoder\.fusion_layer_(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in keys if (m := re.match(r"decoder\.fusion_layer_\d+\.encode_enc_2\.(\d+)\.", k))}
    return levels, (max(blocks) + 1 if blocks else 0)


def cfw_config_from_shapes(shapes: dict[str, tuple], fusion_w: float = 1.0) -> CFWConfig:
    """``CFWConfig`` from the {key: shape} of a CFW file (``loss.*`` may be present). ``fusion_w`` is not in
    the weights (the YAML says 1.0; the StableSR scripts pass ``--dec_w``)."""
    s = {k: _shape(v) for k, v in shapes.items() if not CFW_IGNORABLE(k)}
    base = vae_config_from_shapes(s)
    levels, num_blocks = cfw_fusion_from_keys(s)
    cfg = CFWConfig(**{f: getattr(base, f) for f in base.__dataclass_fields__}, num_fuse_block=num_blocks,
                    fusion_w=fusion_w)
    if levels != cfg.fusion_levels():
        raise ValueError(f"CFW fusion layers at levels {levels}; a {len(cfg.ch_mult)}-level decoder has them at "
                         f"{cfg.fusion_levels()}")
    return cfg
