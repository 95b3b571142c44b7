"""The original sd-x2-latent-upscaler checkpoint (k-diffusion) <-> sdup ``KUNet``.

File: ``laion_text_cond_latent_upscaler_2_1_00470000_slim.pth``, dict key ``model_ema``: the state dict of
the notebook's ``NoiseLevelAndTextConditionedUpscaler`` wrapper, i.e. ``inner_model.*`` (k-diffusion
``ImageDenoiserModelV1``) plus the wrapper's ``low_res_noise_embed.weight``.

    inner_model.timestep_embed.weight (F/2, 1)       time_features.weight (F/2,)               FLAT
    inner_model.mapping_cond / mapping.0 / mapping.2 mapping.cond_proj / fc1 / fc2
    inner_model.proj_in / proj_out                   proj_in / proj_out                        (1x1 convs both)
    inner_model.u_net.d_blocks.{b}.{i}               down.{b}.blocks.{j}.{res|self_attn|cross_attn}
    inner_model.u_net.u_blocks.{u}.{i}               up.{u}.blocks.{j}.…
        with n = 1 + self + cross modules per layer: down i = n·j + 1 (+1 self) (+1 cross), index 0 being
        the downsampler (or Identity); up i = n·j (+1 self) (+1 cross), the upsampler last.
    ResConvBlock main.0.mapper / main.2 /            res.norm1.to_scale_shift / conv1 /
                 main.4.mapper / main.6 / skip       norm2.to_scale_shift / conv2 / skip
    SelfAttention2d norm_in.mapper                   self_attn.norm.to_scale_shift
                    qkv_proj (3C, C, 1, 1) / (3C,)   self_attn.{q,k,v}_proj (C, C) / (C,)  split in 3 + squeeze
                    out_proj (C, C, 1, 1)            self_attn.out_proj (C, C)                 CONV1X1
    CrossAttention2d norm_dec.mapper / norm_enc      cross_attn.norm.to_scale_shift / text_norm
                    q_proj, out_proj (C, C, 1, 1)    cross_attn.q_proj, out_proj (C, C)        CONV1X1
                    kv_proj (2C, ctx) / (2C,)        cross_attn.{k,v}_proj                     SPLIT in 2
    low_res_noise_embed.weight (64, 1)               noise_aug_features.weight (64,)           FLAT

``low_res_noise_embed`` is *used* by the original wrapper (Fourier features of log1p(noise level) of the
low-res latent, the first 128 values of mapping_cond); sdup keeps it as an optional persistent buffer of
the KUNet (``KUNetConfig.noise_aug_embed``, see ``KUNet.noise_level_embedding``) so noise augmentation
works with the original file. diffusers does not ship it (noise level 0 only, where it has no effect).

The ``*.kernel`` buffers (fixed [1,3,3,1]/8 blur kernels, non-persistent in sdup and diffusers; their exact
keys: ``kdiffusion_kernels(cfg)``) are optional on load but checked to hold the fixed values when present,
and are written back on export, so a strict k-diffusion ``load_state_dict`` accepts what ``to_ext`` produces.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

import torch

from ..models.latent_upscaler import KUNetConfig, kunet_state_keys, resampling_kernel, split_io_channels
from .keymap import CONV1X1, FLAT, SPLIT, Entry, KeyMap, Op

INNER = "inner_model."
NOISE_AUG_KEY = "low_res_noise_embed.weight"
RESBLOCK = {"norm1.to_scale_shift": "main.0.mapper", "conv1": "main.2", "norm2.to_scale_shift": "main.4.mapper",
            "conv2": "main.6", "skip": "skip"}
SELF_ATTENTION = {"norm.to_scale_shift": "norm_in.mapper", "out_proj": "out_proj"}
CROSS_ATTENTION = {"norm.to_scale_shift": "norm_dec.mapper", "text_norm": "norm_enc", "q_proj": "q_proj",
                   "out_proj": "out_proj"}


def split_conv1x1(n: int) -> Op:
    """One external 1x1-conv weight (n·o, i, 1, 1) <-> n sdup Linear weights (o, i) (fused q/k/v)."""
    def to_sdup(t: list) -> list:
        return [part.reshape(part.shape[:2]) for part in CONV1X1.to_sdup(t)[0].chunk(n, dim=0)]

    def to_ext(t: list) -> list:
        return CONV1X1.to_ext([torch.cat(t, dim=0)])
    return Op(f"split{n}_conv1x1", to_sdup, to_ext)


def layer_indices(cfg: KUNetConfig, side: str, level: int, j: int) -> dict[str, int]:
    """Positions of layer j's modules inside the k-diffusion ``d_blocks.b`` / ``u_blocks.u`` Sequential."""
    has_self, has_cross = cfg.self_attn_depths[level], cfg.cross_attn_depths[level]
    per_layer = 1 + has_self + has_cross
    res = per_layer * j + (1 if side == "down" else 0)  # d_blocks start with the (Identity or) Downsample2d
    out = {"res": res}
    if has_self:
        out["self_attn"] = res + 1
    if has_cross:
        out["cross_attn"] = res + 1 + has_self
    return out


def _stages(cfg: KUNetConfig):
    """(sdup side, k-diffusion name, stage index, level) for every stage."""
    n = len(cfg.channels)
    for s in range(n):
        yield "down", "d_blocks", s, s
    for s in range(n):
        yield "up", "u_blocks", s, n - 1 - s


def kunet_kdiffusion_rules(cfg: KUNetConfig) -> tuple[list[tuple[str, str]], list[Entry]]:
    """Prefix rules plus the explicit split entries."""
    rules = [("time_features", INNER + "timestep_embed"), ("mapping.cond_proj", INNER + "mapping_cond"),
             ("mapping.fc1", INNER + "mapping.0"), ("mapping.fc2", INNER + "mapping.2"),
             ("proj_in", INNER + "proj_in"), ("proj_out", INNER + "proj_out"),
             ("noise_aug_features", "low_res_noise_embed")]
    explicit = []
    for side, kd_side, s, level in _stages(cfg):
        for j in range(cfg.depths[level]):
            idx = layer_indices(cfg, side, level, j)
            blk, kd = f"{side}.{s}.blocks.{j}", f"{INNER}u_net.{kd_side}.{s}"
            rules += [(f"{blk}.res.{a}", f"{kd}.{idx['res']}.{b}") for a, b in RESBLOCK.items()]
            if "self_attn" in idx:
                sa, kd_sa = f"{blk}.self_attn", f"{kd}.{idx['self_attn']}"
                rules += [(f"{sa}.{a}", f"{kd_sa}.{b}") for a, b in SELF_ATTENTION.items()]
                explicit += [Entry(tuple(f"{sa}.{p}_proj.weight" for p in "qkv"), (f"{kd_sa}.qkv_proj.weight",),
                                   split_conv1x1(3)),
                             Entry(tuple(f"{sa}.{p}_proj.bias" for p in "qkv"), (f"{kd_sa}.qkv_proj.bias",), SPLIT)]
            if "cross_attn" in idx:
                ca, kd_ca = f"{blk}.cross_attn", f"{kd}.{idx['cross_attn']}"
                rules += [(f"{ca}.{a}", f"{kd_ca}.{b}") for a, b in CROSS_ATTENTION.items()]
                explicit += [Entry((f"{ca}.k_proj.{t}", f"{ca}.v_proj.{t}"), (f"{kd_ca}.kv_proj.{t}",), SPLIT)
                             for t in ("weight", "bias")]
    return rules, explicit


def kdiffusion_kernels(cfg: KUNetConfig) -> dict[str, torch.Tensor]:
    """The fixed (4, 4) resampling-kernel buffers of the original file, by key."""
    n, out = len(cfg.channels), {}
    for b in range(1, n):
        out[f"{INNER}u_net.d_blocks.{b}.0.kernel"] = resampling_kernel()
    for u in range(n - 1):
        level = n - 1 - u
        per_layer = 1 + cfg.self_attn_depths[level] + cfg.cross_attn_depths[level]
        out[f"{INNER}u_net.u_blocks.{u}.{per_layer * cfg.depths[level]}.kernel"] = 4 * resampling_kernel()
    return out


class KDiffusionKeyMap(KeyMap):
    """A KeyMap that also knows the original file's fixed kernel buffers: ``to_ext`` writes them,
    ``to_sdup`` accepts them (checking their values on real tensors) and drops them. ``with_prefix``
    keeps them; ``+`` gives a plain KeyMap without them."""

    def __init__(self, entries, kernels: Mapping[str, torch.Tensor]):
        super().__init__(entries)
        self.kernels = dict(kernels)

    def to_sdup(self, ext: Mapping[str, torch.Tensor], what: str = "checkpoint",
                ignore: Callable[[str], bool] = lambda k: False, strict: bool = True, convert=None) -> dict:
        for key, fixed in self.kernels.items():
            t = ext.get(key)
            if t is not None and t.device.type != "meta" and not torch.equal(t.detach().float().cpu(), fixed):
                raise ValueError(f"{what}: {key} is not the fixed resampling kernel k-diffusion uses:\n{t}")
        return super().to_sdup(ext, what, ignore=lambda k: k in self.kernels or ignore(k), strict=strict,
                               convert=convert)

    def to_ext(self, sd: Mapping[str, torch.Tensor]) -> dict:
        out = super().to_ext(sd)
        like = next(iter(out.values()))
        out.update({k: v.to(dtype=like.dtype, device=like.device) for k, v in self.kernels.items()})
        return out

    def with_prefix(self, sdup_prefix: str, ext_prefix: str) -> "KDiffusionKeyMap":
        plain = super().with_prefix(sdup_prefix, ext_prefix)
        return KDiffusionKeyMap(plain.entries, {ext_prefix + k: v for k, v in self.kernels.items()})


def kunet_kdiffusion_keymap(cfg: KUNetConfig) -> KDiffusionKeyMap:
    rules, explicit = kunet_kdiffusion_rules(cfg)
    keys = kunet_state_keys(cfg)
    ops = {k: CONV1X1 for k in keys
           if re.search(r"\.(self_attn\.out_proj|cross_attn\.q_proj|cross_attn\.out_proj)\.weight$", k)}
    ops.update({k: FLAT for k in ("time_features.weight", "noise_aug_features.weight")})
    return KDiffusionKeyMap(KeyMap.from_rules(keys, rules, ops, explicit).entries, kdiffusion_kernels(cfg))


# ------------------------------------------------------------------------------------------------
# config from the weights alone (both layouts)

def _stages_from_keys(shapes: Mapping[str, tuple], pattern: str) -> dict[int, dict[int, dict[str, tuple]]]:
    """{stage: {layer-module index: {parameter suffix: shape}}} for keys matching ``pattern``
    (groups: stage, index, suffix). diffusers' ``resnets.j`` and ``attentions.j`` merge under j."""
    out: dict[int, dict[int, dict[str, tuple]]] = {}
    for key, shape in shapes.items():
        m = re.match(pattern, key)
        if m:
            out.setdefault(int(m[1]), {}).setdefault(int(m[2]), {})[m[3]] = shape
    return out


# per layout: key patterns of the stages, the suffixes that identify a ResConvBlock (and its first conv),
# a self-attention and a cross-attention (and its text-side weight), and the top-level shapes
_LAYOUTS = {
    "kdiffusion": dict(down=r"^inner_model\.u_net\.d_blocks\.(\d+)\.(\d+)\.(.+)$",
                       up=r"^inner_model\.u_net\.u_blocks\.(\d+)\.(\d+)\.(.+)$",
                       res="main.0.mapper.weight", conv1="main.2.weight", self_attn="qkv_proj.weight",
                       cross_attn="kv_proj.weight", mapping=INNER + "mapping.0.weight",
                       mapping_cond=INNER + "mapping_cond.weight", proj_in=INNER + "proj_in.weight",
                       proj_out=INNER + "proj_out.weight"),
    "diffusers": dict(down=r"^down_blocks\.(\d+)\.(?:resnets|attentions)\.(\d+)\.(.+)$",
                      up=r"^up_blocks\.(\d+)\.(?:resnets|attentions)\.(\d+)\.(.+)$",
                      res="norm1.linear.weight", conv1="conv1.weight", self_attn="attn1.to_q.weight",
                      cross_attn="attn2.to_k.weight", mapping="time_embedding.linear_1.weight",
                      mapping_cond="time_embedding.cond_proj.weight", proj_in="conv_in.weight",
                      proj_out="conv_out.weight"),
}


def kunet_config_from_shapes(shapes: Mapping[str, tuple], layout: str, head_dim: int = 64) -> KUNetConfig:
    """Infer the KUNetConfig from key -> shape (``layout`` "kdiffusion" or "diffusers"). The per-head width
    is not in the weights: ``head_dim`` (64 for the released model); group size 32 and sigma_data 1 are
    assumed likewise."""
    if layout not in _LAYOUTS:
        raise ValueError(f"unknown K-UNet layout {layout!r} (kdiffusion | diffusers)")
    L = _LAYOUTS[layout]
    shapes = {k: tuple(v) for k, v in shapes.items()}

    def describe(stage: dict[int, dict[str, tuple]]) -> tuple[int, int, bool, bool, int]:
        """(depth, width, self-attention?, cross-attention?, text width) of one stage."""
        res = [i for i in sorted(stage) if L["res"] in stage[i] and L["conv1"] in stage[i]]
        cross = [stage[i][L["cross_attn"]][1] for i in sorted(stage) if L["cross_attn"] in stage[i]]
        has_self = any(L["self_attn"] in params for params in stage.values())
        width = stage[res[0]][L["conv1"]][0] if res else 0
        return len(res), width, has_self, bool(cross), cross[0] if cross else 0

    down_stages, up_stages = _stages_from_keys(shapes, L["down"]), _stages_from_keys(shapes, L["up"])
    n = len(down_stages)
    if n == 0 or sorted(down_stages) != list(range(n)) or sorted(up_stages) != list(range(n)):
        raise ValueError(f"cannot find the {layout} K-UNet stages in the given keys")
    down = [describe(down_stages[b]) for b in range(n)]
    up = [describe(up_stages[n - 1 - b]) for b in range(n)]  # up stage u works on level n-1-u
    for b in range(n):
        if (down[b][0],) + down[b][2:4] != (up[b][0],) + up[b][2:4]:
            raise ValueError(f"level {b}: down {down[b][:4]} / up {up[b][:4]} (depth, width, self-attention, "
                             "cross-attention) disagree")
    text_widths = {d[4] for d in down + up if d[4]}
    if len(text_widths) > 1:
        raise ValueError(f"several text widths {sorted(text_widths)}")
    input_channels, unet_cond, has_var = split_io_channels(shapes[L["proj_in"]][1], shapes[L["proj_out"]][0])
    return KUNetConfig(
        input_channels=input_channels, unet_cond_channels=unet_cond, channels=[d[1] for d in down],
        depths=[d[0] for d in down], self_attn_depths=[d[2] for d in down], cross_attn_depths=[d[3] for d in down],
        mapping_out=shapes[L["mapping"]][0], mapping_cond_dim=shapes.get(L["mapping_cond"], (0, 0))[1],
        cross_cond_dim=text_widths.pop() if text_widths else 0, head_dim=head_dim, has_variance=has_var,
        noise_aug_embed=layout == "kdiffusion" and NOISE_AUG_KEY in shapes)
