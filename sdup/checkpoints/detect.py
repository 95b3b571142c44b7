"""Which model is this? Detection from a {key: shape} table (a safetensors header, a manifest, or a
loaded state dict), and model configs inferred from shapes.

``detect(shapes)`` is the one public function; ``python -m sdup inspect`` uses the same. What shapes
cannot tell (SD 2.x eps vs v; StableSR 512 vs 768v) is reported as such and resolved by a YAML, the
file name, or an explicit option.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..models.unet import UNetConfig
from ..models.vae import VAEConfig

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."
OPENCLIP = "cond_stage_model.model."
STRUCT = "structcond_stage_model."


@dataclass
class Detection:
    family: str          # sd1 | sd2 | x4 | stablesr | stablesr_cfw_vae | vae | x2 | unknown
    layout: str          # ldm | diffusers | kdiffusion | sdup | unknown
    component: str | None = None  # for a single diffusers component file/manifest: unet | vae | text_encoder
    notes: list[str] = field(default_factory=list)

    def __str__(self):
        what = f"{self.family} ({self.layout} layout" + (f", {self.component} only" if self.component else "") + ")"
        return what + "".join(f"; {n}" for n in self.notes)


FAMILY_NAMES = {
    "sd1": "Stable Diffusion 1.x (CLIP ViT-L/14, eps)",
    "sd2": "Stable Diffusion 2.x (OpenCLIP ViT-H/14; 512-eps or 768-v)",
    "x4": "stable-diffusion-x4-upscaler (v, noise-level conditioned, VAE f=4)",
    "stablesr": "StableSR (SD 2.1 + time-aware encoder + SFT)",
    "stablesr_cfw_vae": "StableSR CFW autoencoder (vqgan_cfw)",
    "vae": "standalone KL autoencoder",
    "x2": "sd-x2-latent-upscaler (K-UNet)",
    "unknown": "not a supported checkpoint",
}


def _has(shapes, prefix):
    return any(k.startswith(prefix) for k in shapes)


def detect(shapes: dict[str, tuple], metadata: dict | None = None) -> Detection:
    metadata = metadata or {}
    if "sdup_family" in metadata:
        return Detection(metadata["sdup_family"], "sdup")
    if _has(shapes, "inner_model.u_net."):
        return Detection("x2", "kdiffusion")
    if _has(shapes, UNET):
        in_ch = shapes.get(UNET + "input_blocks.0.0.weight", (0, 0))[1]
        if _has(shapes, STRUCT):
            return Detection("stablesr", "ldm", notes=["512-eps and 768-v StableSR share shapes: eps unless the YAML/name says v"])
        if UNET + "label_emb.weight" in shapes or in_ch == 7:
            return Detection("x4", "ldm")
        if _has(shapes, CLIP):
            return Detection("sd1", "ldm")
        if _has(shapes, OPENCLIP):
            return Detection("sd2", "ldm", notes=["512-eps and 768-v share shapes: eps unless the YAML/name says v"])
        ctx = next((s[1] for k, s in shapes.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
        return Detection({768: "sd1", 1024: "sd2"}.get(ctx, "unknown"), "ldm", notes=["no text encoder in the file"])
    if _has(shapes, "decoder.fusion_layer_"):
        return Detection("stablesr_cfw_vae", "ldm")
    if "encoder.conv_in.weight" in shapes and "decoder.conv_in.weight" in shapes:
        if _has(shapes, "encoder.down_blocks."):
            return Detection("vae", "diffusers", component="vae")
        return Detection("vae", "ldm")
    # single diffusers components
    if "conv_in.weight" in shapes and _has(shapes, "down_blocks."):
        if "time_proj.weight" in shapes:
            return Detection("x2", "diffusers", component="unet")
        ctx = next((s[1] for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
        if "class_embedding.weight" in shapes or shapes["conv_in.weight"][1] == 7:
            return Detection("x4", "diffusers", component="unet")
        fam = {768: "sd1", 1024: "sd2"}.get(ctx, "unknown")
        return Detection(fam, "diffusers", component="unet")
    if "text_model.embeddings.token_embedding.weight" in shapes or "embeddings.token_embedding.weight" in shapes:
        width = next(s[1] for k, s in shapes.items() if k.endswith("token_embedding.weight"))
        fam = {768: "sd1", 1024: "sd2"}.get(width, "unknown")
        return Detection(fam, "diffusers", component="text_encoder",
                         notes=["CLIP ViT-L/14 text (SD1, x2)" if width == 768 else "OpenCLIP ViT-H/14 text (SD2, x4, StableSR)"])
    return Detection("unknown", "unknown", notes=[_summary(shapes)])


def _summary(shapes) -> str:
    if not shapes:
        return "no tensors"
    prefixes = sorted({k.split(".")[0] for k in shapes})
    return f"{len(shapes)} tensors, top-level names: {', '.join(prefixes[:6])}" + (" ..." if len(prefixes) > 6 else "")


# ----------------------------------------------------------------------------------------------
# Configs from shapes (original layout, prefixes stripped)

def unet_config_from_shapes(s: dict[str, tuple], family: str) -> UNetConfig:
    """LDM UNet hyper-parameters from its keys. Head counts are not in the weights: they follow the
    family (SD1 / x4: 8 heads; SD2 / StableSR: 64-channel heads)."""
    C, in_ch = s["input_blocks.0.0.weight"][:2]
    blocks = sorted({int(m.group(1)) for k in s if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    ops = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in s]
    L = (ops[0] - 1) if ops else len(blocks) - 1
    levels = len(blocks) // (L + 1)
    first = [1 + b * (L + 1) for b in range(levels)]
    mult = tuple(s[f"input_blocks.{i}.0.out_layers.3.weight"][0] // C for i in first)
    attn_res = tuple(2 ** b for b, i in enumerate(first) if f"input_blocks.{i}.1.proj_in.weight" in s)
    ctx = next(v[1] for k, v in s.items() if k.endswith("attn2.to_k.weight"))
    depth = len({m.group(1) for k in s if (m := re.match(r"middle_block\.1\.transformer_blocks\.(\d+)\.", k))})
    linear = len(s["middle_block.1.proj_in.weight"]) == 2

    def no_self(prefix, ch):  # attn1 reading the text context (x4); ambiguous when ch == context width
        k = f"{prefix}.transformer_blocks.0.attn1.to_k.weight"
        return k in s and s[k][1] != ch

    disable = tuple(no_self(f"input_blocks.{i}.1", mult[b] * C) for b, i in enumerate(first))
    heads = {"num_head_channels": 64} if family in ("sd2", "stablesr") else {"num_heads": 8}
    return UNetConfig(
        in_channels=in_ch, out_channels=s["out.2.weight"][0], model_channels=C, channel_mult=mult, num_res_blocks=L,
        attention_resolutions=attn_res, context_dim=ctx, transformer_depth=depth, use_linear_in_transformer=linear,
        disable_self_attentions=disable if any(disable) else None,
        disable_middle_self_attn=no_self("middle_block.1", mult[-1] * C),
        num_classes=s["label_emb.weight"][0] if "label_emb.weight" in s else None, **heads)


def _vae_config(s: dict[str, tuple], down: str, res: str) -> VAEConfig:
    """KL-VAE hyper-parameters from its keys; ``down`` / ``res`` name the encoder levels and their ResBlocks in the
    layout (``encoder.{down}.{i}.{res}.{j}``)."""
    ch = s["encoder.conv_in.weight"][0]
    levels = len({m.group(1) for k in s if (m := re.match(rf"encoder\.{down}\.(\d+)\.", k))})
    nres = len({m.group(1) for k in s if (m := re.match(rf"encoder\.{down}\.0\.{res}\.(\d+)\.", k))})
    mult = tuple(s[f"encoder.{down}.{i}.{res}.0.conv1.weight"][0] // ch for i in range(levels))
    return VAEConfig(ch=ch, ch_mult=mult, num_res_blocks=nres, z_channels=s["decoder.conv_in.weight"][1],
                     embed_dim=s["post_quant_conv.weight"][0], in_channels=s["encoder.conv_in.weight"][1],
                     out_ch=s["decoder.conv_out.weight"][0])


def vae_config_from_shapes(s: dict[str, tuple]) -> VAEConfig:
    """LDM KL-VAE hyper-parameters from its keys (``encoder.down.{i}.block.{j}`` layout)."""
    return _vae_config(s, "down", "block")


def unet_config_from_diffusers_shapes(s: dict[str, tuple], family: str) -> UNetConfig:
    """The same for a diffusers ``unet/`` weight file without its config.json (e.g. a key manifest)."""
    C, in_ch = s["conv_in.weight"][:2]
    levels = len({m.group(1) for k in s if (m := re.match(r"down_blocks\.(\d+)\.", k))})
    L = len({m.group(1) for k in s if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))})
    mult = tuple(s[f"down_blocks.{b}.resnets.0.conv2.weight"][0] // C for b in range(levels))
    attn = [f"down_blocks.{b}.attentions.0.proj_in.weight" in s for b in range(levels)]
    ctx = next(v[1] for k, v in s.items() if k.endswith("attn2.to_k.weight"))
    depth = len({m.group(1) for k in s if (m := re.match(r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.", k))})

    def no_self(prefix, ch):
        k = f"{prefix}.transformer_blocks.0.attn1.to_k.weight"
        return k in s and s[k][1] != ch

    disable = tuple(no_self(f"down_blocks.{b}.attentions.0", mult[b] * C) for b in range(levels))
    heads = {"num_head_channels": 64} if family in ("sd2", "stablesr") else {"num_heads": 8}
    return UNetConfig(
        in_channels=in_ch, out_channels=s["conv_out.weight"][0], model_channels=C, channel_mult=mult, num_res_blocks=L,
        attention_resolutions=tuple(2 ** b for b in range(levels) if attn[b]), context_dim=ctx, transformer_depth=depth,
        use_linear_in_transformer=len(s["mid_block.attentions.0.proj_in.weight"]) == 2,
        disable_self_attentions=disable if any(disable) else None,
        disable_middle_self_attn=no_self("mid_block.attentions.0", mult[-1] * C),
        num_classes=s["class_embedding.weight"][0] if "class_embedding.weight" in s else None, **heads)


def vae_config_from_diffusers_shapes(s: dict[str, tuple]) -> VAEConfig:
    return _vae_config(s, "down_blocks", "resnets")
