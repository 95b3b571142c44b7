"""Writing sdup weights back out in the official layouts, through the same key tables used to load.

    save_ldm(model, "out.safetensors")      # original single file (.safetensors or .ckpt {"state_dict": ...})
    save_diffusers(model, "out_folder/")     # diffusers folder: unet/ vae/ text_encoder/ (+ config.json each)
    save_sdup(model, "out.safetensors")      # sdup's own file (loader.py)

Only tensors sdup holds are written: schedule buffers, the unused last OpenCLIP block, ``text_projection``
and ``logit_scale`` are not (upstream code loads with ``strict=False`` and recomputes the schedules).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..fileio import atomic_write
from . import diffusers as dfs
from . import ldm
from .loader import LoadedModel


def _cpu(sd: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def ldm_state_dict(model: LoadedModel) -> dict:
    """The model in the original single-file naming (flat, with component prefixes)."""
    from .hf_clip import hf_clip_keymap, openclip_keymap
    out = {}
    if model.family in ("vae", "stablesr_cfw_vae"):
        cfg = model.configs["vae"]
        if model.family == "vae":
            return _cpu(ldm.vae_keymap(cfg, model.vae.state_dict()).to_ext(model.vae.state_dict()))
        from .ldm import cfw_vae_keymap
        return _cpu(cfw_vae_keymap(cfg, model.vae.state_dict()).to_ext(model.vae.state_dict()))
    if model.family == "x2":
        from .kdiffusion import kunet_kdiffusion_keymap
        return _cpu(kunet_kdiffusion_keymap(model.configs["unet"]).to_ext(model.unet.state_dict()))
    if model.unet is not None:
        sd = model.unet.state_dict()
        out.update(ldm.unet_keymap(model.configs["unet"], sd).with_prefix("", "model.diffusion_model.").to_ext(sd))
    if model.vae is not None:
        sd = model.vae.state_dict()
        out.update(ldm.vae_keymap(model.configs["vae"], sd).with_prefix("", "first_stage_model.").to_ext(sd))
    if model.text_encoder is not None:
        cfg, sd = model.configs["text_encoder"], model.text_encoder.state_dict()
        if model.family == "sd1":
            out.update(hf_clip_keymap(cfg).with_prefix("", "cond_stage_model.transformer.").to_ext(sd))
        else:
            out.update(openclip_keymap(cfg).with_prefix("", "cond_stage_model.model.").to_ext(sd))
    if model.struct_encoder is not None:
        from .ldm import struct_encoder_keymap
        sd = model.struct_encoder.state_dict()
        out.update(struct_encoder_keymap(model.configs["struct_encoder"], sd).with_prefix("", "structcond_stage_model.").to_ext(sd))
    return _cpu(out)


def save_ldm(model: LoadedModel, path: str | Path) -> None:
    path = Path(path)
    sd = ldm_state_dict(model)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        atomic_write(path, lambda p: save_file(sd, str(p)))
    else:
        atomic_write(path, lambda p: torch.save({"state_dict": sd}, p))


# ------------------------------------------------------------------------------------------------
# diffusers

def unet_diffusers_config(cfg) -> dict:
    levels = len(cfg.channel_mult)
    boc = [cfg.model_channels * m for m in cfg.channel_mult]
    attn = [2 ** b in cfg.attention_resolutions for b in range(levels)]
    heads = [cfg.heads_for(c)[0] for c in boc]
    only_cross = list(cfg.disable_self_attentions) if cfg.disable_self_attentions else False
    return {"_class_name": "UNet2DConditionModel", "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "block_out_channels": boc, "layers_per_block": cfg.num_res_blocks,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
            "attention_head_dim": heads[0] if cfg.num_head_channels == -1 else heads,
            "cross_attention_dim": cfg.context_dim, "use_linear_projection": cfg.use_linear_in_transformer,
            "only_cross_attention": only_cross, "mid_block_only_cross_attention": cfg.disable_middle_self_attn,
            "num_class_embeds": cfg.num_classes, "transformer_layers_per_block": cfg.transformer_depth,
            "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
            "downsample_padding": 1, "center_input_sample": False, "upcast_attention": False}


def vae_diffusers_config(cfg, scale_factor: float) -> dict:
    n = len(cfg.ch_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.out_ch,
            "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "layers_per_block": cfg.num_res_blocks,
            "latent_channels": cfg.embed_dim, "norm_num_groups": 32, "act_fn": "silu", "scaling_factor": scale_factor}


def text_diffusers_config(cfg) -> dict:
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.width, "intermediate_size": cfg.mlp_width, "num_hidden_layers": cfg.layers,
            "num_attention_heads": cfg.heads, "max_position_embeddings": cfg.context_length, "hidden_act": cfg.act,
            "layer_norm_eps": 1e-5, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id, "projection_dim": cfg.width}


PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "x4": "StableDiffusionUpscalePipeline",
             "x2": "StableDiffusionLatentUpscalePipeline"}


def save_diffusers(model: LoadedModel, folder: str | Path) -> None:
    """Write a diffusers folder (weights as safetensors). StableSR and the CFW VAE have no diffusers layout."""
    from safetensors.torch import save_file
    from .hf_clip import hf_clip_keymap
    if model.family not in PIPELINES and model.family != "vae":
        raise ValueError(f"{model.family} has no diffusers layout (diffusers has no StableSR): use the ldm or sdup format")
    parts = {}
    if model.unet is not None:
        sd = model.unet.state_dict()
        if model.family == "x2":
            parts["unet"] = (dfs.kunet_diffusers_keymap(model.configs["unet"]).to_ext(sd),
                             dfs.kunet_diffusers_config(model.configs["unet"]), "diffusion_pytorch_model")
        else:
            parts["unet"] = (dfs.unet_keymap(model.configs["unet"], sd).to_ext(sd),
                             unet_diffusers_config(model.configs["unet"]), "diffusion_pytorch_model")
    if model.vae is not None:
        sd = model.vae.state_dict()
        parts["vae"] = (dfs.vae_keymap(model.configs["vae"], sd).to_ext(sd),
                        vae_diffusers_config(model.configs["vae"], model.scale_factor), "diffusion_pytorch_model")
    if model.text_encoder is not None:
        cfg = model.configs["text_encoder"]
        parts["text_encoder"] = (hf_clip_keymap(cfg).to_ext(model.text_encoder.state_dict()), text_diffusers_config(cfg), "model")

    def fill(tmp: Path) -> None:
        for comp, (sd, cfg, stem) in parts.items():
            (tmp / comp).mkdir(parents=True)
            save_file(_cpu(sd), str(tmp / comp / f"{stem}.safetensors"))
            (tmp / comp / "config.json").write_text(json.dumps(cfg, indent=2))
        if model.family in PIPELINES:
            index = {"_class_name": PIPELINES[model.family], **{c: ["diffusers" if c != "text_encoder" else "transformers",
                     parts[c][1].get("_class_name", "CLIPTextModel")] for c in parts}}
            if model.family == "x4":
                index["max_noise_level"] = model.schedule.get("max_noise_level", 350)
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
            pred = {"eps": "epsilon", "v": "v_prediction", "sample": "sample"}.get(model.prediction, "epsilon")
            (tmp / "scheduler").mkdir()
            (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps({
                "_class_name": "EulerDiscreteScheduler" if model.family == "x2" else "DDIMScheduler",
                "beta_start": model.schedule["linear_start"], "beta_end": model.schedule["linear_end"],
                "beta_schedule": "scaled_linear", "num_train_timesteps": model.schedule.get("timesteps", 1000),
                "prediction_type": pred, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False}, indent=2))

    atomic_write(folder, fill, folder=True)
