"""Text conditioning, one rule for every pipeline: prompts as text, token ids or embeddings -> the UNets' contexts.

The rule (``check_prompts``), the same for the prompt and the negative prompt of x4, x2, StableSR and txt2img:
each side is text / token ids OR precomputed embeddings (``prompt_embeds`` / ``negative_embeds``).  Text left at
None or "" together with embeddings is fine (the embeddings are used); other text together with embeddings raises a
ValueError naming both.  Without embeddings a prompt left at None is "" (the upscalers' reference prompt), except
where it is required (txt2img: a ValueError); the negative prompt is "" by default everywhere.

    check_prompts(prompt, negative_prompt, prompt_embeds, negative_embeds) -> Prompts (the rule applied)
    token_ids(model, prompts)         strings (CLIP BPE) or token ids -> (B, 77) int64, padded as the model's tokenizer
    encode_prompts(model, prompts)    -> text-encoder ``.context`` (B, 77, D): what SD 1.x / 2.x UNets attend to
    text_contexts(model, prompts, batch, guided, device)  (cond, uncond) dicts of the contexts (B, 77, D)
    record_prompts(params, prompts, ...)  the prompts as the parameters record them (text, ids or "<embeddings>")

The x2 latent upscaler's K-UNet takes other text features (same rule): the states before the final LayerNorm, the
pooled vector and, as the original model, a padding mask.

    encode_x2_prompts(model, prompts) -> (hidden_pre_ln (B, 77, D), pooled (B, D), padding mask (B, 77))
    pooled_text(model, prompt, embeds, pooled, mask, batch, what, mask_padding)  one side of it, text or embeddings
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

Tensor = torch.Tensor
EMBEDS = {"prompt": "prompt_embeds", "negative_prompt": "negative_embeds"}  # each side's embeddings argument


def _text_config(model):
    if model.text_encoder is None:
        raise ValueError(f"{model.family} model has no text encoder: pass prompt embeddings instead")
    return model.text_encoder.cfg


def _rows(prompts) -> list:
    """Prompts as a list of rows, each a string or a list of token ids."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Tensor):
        if prompts.is_floating_point():
            raise ValueError("got a float tensor where token ids were expected (embeddings go to prompt_embeds=)")
        t = prompts.reshape(1, -1) if prompts.ndim == 1 else prompts
        if t.ndim != 2:
            raise ValueError(f"token ids must be (L,) or (B, L), got {tuple(prompts.shape)}")
        return t.tolist()
    if isinstance(prompts, Sequence) and len(prompts) > 0:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in prompts):
            return [list(prompts)]
        rows = []
        for v in prompts:
            if isinstance(v, str):
                rows.append(v)
            elif isinstance(v, Tensor) and not v.is_floating_point() and v.ndim == 1:
                rows.append(v.tolist())
            elif isinstance(v, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                rows.append([int(i) for i in v])
            else:
                break
        else:
            return rows
    raise ValueError("prompts must be a string, token ids, or a list of strings / token-id lists")


def token_ids(model, prompts) -> Tensor:
    """Prompts -> (B, context_length) int64 token ids, padded with the model's pad token.

    ``prompts``: a string, token ids (a (L,) / (B, L) int tensor or a list of ints), or a list whose rows are
    strings or token-id lists. Strings go through the CLIP BPE ``model.tokenizer``; token ids are taken verbatim
    INCLUDING the start / end tokens and padded with ``pad_token_id`` to the context length. Text needs a BPE
    tokenizer, which the tiny test encoders (vocabulary 256) do not have -- except the empty prompt, which is
    ``[bos, eos, pad, ...]`` for any vocabulary (exactly what the CLIP tokenizer makes of "")."""
    cfg = _text_config(model)
    rows = _rows(prompts)
    ids = torch.full((len(rows), cfg.context_length), cfg.pad_token_id, dtype=torch.long)
    texts = [i for i, r in enumerate(rows) if isinstance(r, str) and (r or model.tokenizer is not None)]
    if texts:
        if model.tokenizer is None:
            raise ValueError(f"this text encoder (vocabulary {cfg.vocab_size}) has no BPE tokenizer: "
                             "give the prompt as token ids")
        ids[texts] = model.tokenizer([rows[i] for i in texts])
    for i, row in enumerate(rows):
        if isinstance(row, str):
            if row or model.tokenizer is not None:
                continue
            row = [cfg.bos_token_id, cfg.eos_token_id]
        if not 0 < len(row) <= cfg.context_length:
            raise ValueError(f"a token-id prompt needs 1 to {cfg.context_length} ids, got {len(row)}")
        if min(row) < 0 or max(row) >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got {min(row)}..{max(row)}")
        ids[i, : len(row)] = torch.tensor(row)
    return ids


def encode_prompts(model, prompts) -> Tensor:
    """Prompts (see ``token_ids``) -> the text encoder's ``.context`` (B, 77, D): last layer after the final
    LayerNorm for SD 1.x, penultimate layer + ln_final for SD 2.x (the encoder's config decides). Identical
    prompts are encoded once, so a row does not depend on the other rows of the batch."""
    ids = token_ids(model, prompts)
    uniq, inverse = torch.unique(ids, dim=0, return_inverse=True)
    device = next(model.text_encoder.parameters()).device
    ctx = model.text_encoder(uniq.to(device)).context
    return ctx[inverse.to(device)]


def prompt_rows(prompt, batch: int):
    """One prompt (text, or token ids as (L,) / (1, L)) repeated for the batch; other prompts as given."""
    rows = [prompt] if isinstance(prompt, str) else prompt
    if isinstance(rows, (list, tuple)) and len(rows) == 1 and batch > 1:
        rows = list(rows) * batch
    if isinstance(rows, Tensor) and not rows.is_floating_point() and (rows.ndim == 1 or rows.shape[0] == 1) \
            and batch > 1:
        rows = rows.reshape(1, -1).expand(batch, -1)
    return rows


@dataclass(frozen=True)
class Prompts:
    """The text conditioning of one run after ``check_prompts``: each side is text / token ids to encode, or
    precomputed embeddings (then its text is None)."""
    prompt: object = ""
    negative_prompt: object = ""
    prompt_embeds: Tensor | None = None
    negative_embeds: Tensor | None = None


def _unset(prompt) -> bool:
    return prompt is None or (isinstance(prompt, str) and prompt == "")


def _one_side(text, embeds, what: str, default):
    """The rule for one side (module docstring): the text to encode, or None when the embeddings are used."""
    if embeds is not None:
        if not _unset(text):
            raise ValueError(f"give either {what} or {EMBEDS[what]}, not both")
        return None
    if text is None:
        if default is None:
            raise ValueError(f"give a {what.replace('_', ' ')} (text or token ids; \"\" is fine) or {EMBEDS[what]}")
        return default
    return text


def check_prompts(prompt, negative_prompt="", prompt_embeds: Tensor | None = None,
                  negative_embeds: Tensor | None = None, *, required: bool = False) -> Prompts:
    """The one conditioning rule of every pipeline (module docstring). ``required``: a prompt (or its embeddings)
    must be given (txt2img); otherwise a prompt left at None is ""."""
    return Prompts(_one_side(prompt, prompt_embeds, "prompt", None if required else ""),
                   _one_side(negative_prompt, negative_embeds, "negative_prompt", ""), prompt_embeds, negative_embeds)


def per_sample(t: Tensor, batch: int, what: str, name: str = "embeddings") -> Tensor:
    """One row (or as many rows as the batch) -> ``batch`` rows; ValueError for any other count."""
    if t.shape[0] == 1 and batch > 1:
        t = t.expand(batch, *t.shape[1:])
    if t.shape[0] != batch:
        raise ValueError(f"{what}: {name} have {t.shape[0]} rows for a batch of {batch}")
    return t


def check_embeddings(embeds, what: str) -> Tensor:
    """Precomputed embeddings (77, D) / (B, 77, D) -> (B, 77, D)."""
    if not isinstance(embeds, Tensor) or not embeds.is_floating_point() or embeds.ndim not in (2, 3):
        raise ValueError(f"{what}_embeds must be a float tensor (77, D) or (B, 77, D)")
    return embeds[None] if embeds.ndim == 2 else embeds


def prompt_context(model, text, embeds, batch: int, what: str) -> Tensor:
    """(batch, 77, D) fp32 context from text / token ids, or from precomputed embeddings."""
    e = check_embeddings(embeds, what) if embeds is not None else encode_prompts(model, prompt_rows(text, batch))
    e = per_sample(e, batch, what)
    dim = getattr(getattr(model.unet, "cfg", None), "context_dim", None)
    if dim is not None and e.shape[-1] != dim:
        raise ValueError(f"{what}: embeddings of width {e.shape[-1]}, the UNet expects {dim}")
    return e.float()


def text_contexts(model, prompts: Prompts, batch: int, guided: bool, device) -> tuple[dict, dict | None]:
    """(cond, uncond) = (dict(context=...), dict(context=...) or None when guidance does not run): the contexts on
    ``device`` of a CLIP-conditioned UNet (x4, StableSR, txt2img), the start of the denoiser's ``extra_args``."""
    cond = prompt_context(model, prompts.prompt, prompts.prompt_embeds, batch, "prompt").to(device)
    if not guided:
        return dict(context=cond), None
    uncond = prompt_context(model, prompts.negative_prompt, prompts.negative_embeds, batch, "negative_prompt")
    return dict(context=cond), dict(context=uncond.to(device))


def describe_prompt(prompt):
    """JSON-friendly record of a prompt given as text, token ids or embeddings."""
    if isinstance(prompt, Tensor):
        return {"token_ids": prompt.tolist()}
    if isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], str):
        return {"token_ids": [list(r) if not isinstance(r, int) else r for r in prompt]}
    return prompt


def record_prompts(params: dict, prompts: Prompts, batch: int, guidance: float, seeds) -> dict:
    """Add prompt / negative_prompt (text, ids or "<embeddings>") and seeds to a parameters dict."""
    sides = {"prompt": (prompts.prompt, prompts.prompt_embeds),
             "negative_prompt": (prompts.negative_prompt, prompts.negative_embeds)}
    for key, (value, embeds) in sides.items():
        if embeds is not None:
            params[key] = "<embeddings>"
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value) and len(value) == batch:
            params[key + "s"] = list(value)
        else:
            params[key] = describe_prompt(value)
    if guidance == 1:  # the negative prompt was never used
        params.pop("negative_prompt", None)
        params.pop("negative_prompts", None)
    if seeds is not None:
        params["seeds"] = seeds
    return params


# ------------------------------------------------------------------------------------------------
# the x2 latent upscaler's text features

def padding_mask(model, ids: Tensor) -> Tensor:
    """(B, L) 1.0 for real tokens (start, text and the first end-of-text token), 0.0 for the padding after it --
    the tokenizer's ``attention_mask`` that the original model receives."""
    eos = model.text_encoder.cfg.eos_token_id
    is_eos = ids == eos
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))
    return (torch.arange(ids.shape[1])[None, :] <= first[:, None]).float()


def encode_x2_prompts(model, prompts) -> tuple[Tensor, Tensor, Tensor]:
    """Prompts (text or token ids, see ``conditioning.token_ids``) -> (hidden (B, 77, D) before the final LayerNorm,
    pooled (B, D), padding mask (B, 77)). Identical prompts are encoded once."""
    if model.text_encoder is None:
        raise ValueError("this x2 model has no text encoder: pass prompt_embeds and pooled_prompt_embeds")
    ids = token_ids(model, prompts)
    uniq, inverse = torch.unique(ids, dim=0, return_inverse=True)
    device = next(model.text_encoder.parameters()).device
    out = model.text_encoder(uniq.to(device))
    return (out.hidden_pre_ln[inverse.to(device)].float(), out.pooled[inverse.to(device)].float(),
            padding_mask(model, ids).to(device))


def pooled_text(model, prompt, embeds, pooled, mask, batch: int, what: str, mask_padding: bool):
    """The x2 K-UNet's text for one side: (context (B, 77, D), pooled (B, D), mask (B, 77) or None) from text / ids
    (``encode_x2_prompts``) or from embeddings with their pooled vector (and mask)."""
    if embeds is not None:
        if pooled is None:
            raise ValueError(f"{what}_embeds needs the matching pooled vector ({what.replace('prompt', 'pooled')}"
                             f"{'' if what == 'negative_prompt' else '_prompt'}_embeds): the x2 UNet is "
                             "conditioned on both")
        ctx = check_embeddings(embeds, what)
        pooled = pooled[None] if pooled.ndim == 1 else pooled
        if mask_padding and mask is None:
            raise ValueError(f"mask_padding=True with {what}_embeds needs the padding mask too ({what}_mask (B, 77), "
                             "1 = real token): it cannot be recovered from embeddings")
        if mask is not None:
            mask = (mask[None] if mask.ndim == 1 else mask).float()
    else:
        ctx, pooled, mask = encode_x2_prompts(model, prompt_rows(prompt, batch))
    ctx, pooled = per_sample(ctx, batch, what), per_sample(pooled, batch, what, "pooled")
    mask = per_sample(mask, batch, what, "mask") if mask is not None else None
    cfg = model.unet.cfg
    if ctx.shape[-1] != cfg.cross_cond_dim or pooled.shape[-1] != cfg.mapping_cond_dim - cfg.noise_aug_dim:
        raise ValueError(f"{what}: text width {ctx.shape[-1]} / pooled {pooled.shape[-1]}, the K-UNet expects "
                         f"{cfg.cross_cond_dim} / {cfg.mapping_cond_dim - cfg.noise_aug_dim}")
    return ctx.float(), pooled.float(), (mask if mask_padding else None)
