"""Text encoders (CLIP ViT-L/14 for SD1 / x2, OpenCLIP ViT-H/14 for x4 / StableSR) and the CLIP tokenizer.

Both towers are the same module: token + learned position embedding, pre-LN transformer blocks with a
causal mask (and no padding mask), a final LayerNorm. They differ only in

    activation   quick_gelu (x * sigmoid(1.702 x), OpenAI CLIP)  vs  exact erf GELU (OpenCLIP)
    which block  SD1 uses the last block; SD2 / x4 / StableSR use the *penultimate* one, then ln_final
    padding      SD1's HF tokenizer pads with <|endoftext|> (49407); open_clip pads with 0 ("!")

sdup builds the blocks from open_clip (``open_clip.transformer.Transformer``, random init), so the
parameter names are open_clip's own and are the sdup names:

    token_embedding.weight, positional_embedding,
    transformer.resblocks.{i}.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj},
    ln_final

For "penultimate" models only the used blocks are built (``cfg.layers`` = built blocks): OpenCLIP ViT-H/14 has
24 blocks in the checkpoint, sdup builds 23 (exactly what diffusers' 23-layer ``CLIPTextModel`` is), and
``ln_final`` is applied after the 23rd, as ``FrozenOpenCLIPEmbedder(layer="penultimate")`` does.
Checkpoint layouts (HF ``CLIPTextModel``, original open_clip) are mapped in ``sdup/checkpoints/hf_clip.py``.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Mapping, NamedTuple, Sequence

import torch
from torch import nn
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import LayerNorm, QuickGELU, Transformer

CLIP_VOCAB = 49408  # real BPE vocabulary; <|startoftext|> = 49406, <|endoftext|> = 49407


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    width: int
    layers: int                     # transformer blocks that are BUILT (checkpoint blocks - 1 for "penultimate")
    heads: int
    mlp_width: int
    act: Literal["quick_gelu", "gelu"]
    context_length: int = 77
    output: Literal["last", "penultimate"] = "last"  # which checkpoint block feeds ln_final (see checkpoint_layers)
    pad_token_id: int = 49407       # tokenizer padding: 49407 for SD1's HF CLIPTokenizer, 0 for open_clip
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    @property
    def checkpoint_layers(self) -> int:
        """Blocks stored in an original-format (open_clip) checkpoint: one more than built for "penultimate"."""
        return self.layers + (self.output == "penultimate")


CLIP_VIT_L14 = TextConfig(vocab_size=49408, width=768, layers=12, heads=12, mlp_width=3072, act="quick_gelu",
                          output="last", pad_token_id=49407)
OPENCLIP_VIT_H14 = TextConfig(vocab_size=49408, width=1024, layers=23, heads=16, mlp_width=4096, act="gelu",
                              output="penultimate", pad_token_id=0)  # 24 blocks in the checkpoint, 23 built
# Tiny fixture towers (vocab 256; ids 254 / 255 stand in for <|startoftext|> / <|endoftext|>).
TINY_CLIP = TextConfig(vocab_size=256, width=32, layers=2, heads=2, mlp_width=64, act="quick_gelu",
                       output="last", pad_token_id=255, bos_token_id=254, eos_token_id=255)
TINY_OPENCLIP = TextConfig(vocab_size=256, width=32, layers=2, heads=2, mlp_width=128, act="gelu",
                           output="penultimate", pad_token_id=0, bos_token_id=254, eos_token_id=255)  # 3 in ckpt

# Names used in upstream YAMLs: FrozenCLIPEmbedder ``version:`` and FrozenOpenCLIPEmbedder ``arch:``.
KNOWN_TEXT_CONFIGS: dict[str, TextConfig] = {
    "openai/clip-vit-large-patch14": CLIP_VIT_L14,
    "sdup-tiny-clip-text": TINY_CLIP,
    "ViT-H-14": OPENCLIP_VIT_H14,
    "sdup-tiny-openclip": TINY_OPENCLIP,
}


class TextOutput(NamedTuple):
    context: torch.Tensor        # (B, 77, W) after ln_final: what the SD1 / x4 / StableSR UNets attend to
    hidden_pre_ln: torch.Tensor  # (B, 77, W) last built block, before ln_final (x2 latent upscaler; HF hidden_states[-1])
    pooled: torch.Tensor         # (B, W) ln_final output at the first eos_token_id of each row (HF pooler_output)


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        mlp_ratio = cfg.mlp_width / cfg.width
        assert int(cfg.width * mlp_ratio) == cfg.mlp_width, "open_clip blocks need mlp_width = int(width * ratio)"
        act = {"quick_gelu": QuickGELU, "gelu": nn.GELU}[cfg.act]  # nn.GELU() is the exact (erf) GELU
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        # batch_first=True everywhere: attention runs over the tokens of each sample, as in the released
        # (sequence-first, open_clip 2.0) code -- the numbers are the same, only the layout differs.
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, mlp_ratio=mlp_ratio, act_layer=act,
                                       norm_layer=LayerNorm, batch_first=True)
        self.ln_final = LayerNorm(cfg.width)  # eps 1e-5
        self.init_buffers()
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def init_buffers(self, device=None):
        """(Re)compute the non-persistent causal mask (also after a meta-device build, see the loader)."""
        L = self.cfg.context_length
        mask = torch.full((L, L), float("-inf"), device=device).triu(1)  # causal, additive
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> TextOutput:
        B, L = input_ids.shape                                        # (B, 77) int64
        x = self.token_embedding(input_ids) + self.positional_embedding[:L]   # (B, L, W)
        h = self.transformer(x, attn_mask=self.causal_mask[:L, :L])   # (B, L, W), no padding mask
        context = self.ln_final(h)                                    # (B, L, W)
        eos = (input_ids == self.cfg.eos_token_id).int().argmax(-1)   # (B,) first eos (0 if none)
        pooled = context[torch.arange(B, device=h.device), eos]       # (B, W)
        return TextOutput(context, h, pooled)


def text_encoder_keys(cfg: TextConfig) -> list[str]:
    """sdup state-dict names of a ``TextEncoder(cfg)`` (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        return list(TextEncoder(cfg).state_dict())


# ------------------------------------------------------------------------------------------------
# Config inference from a checkpoint's key -> shape dict


def text_config_from_shapes(shapes: Mapping[str, Sequence[int]], layout: Literal["hf", "openclip"],
                            heads: int | None = None, **overrides) -> TextConfig:
    """Infer a ``TextConfig`` from the shapes of a text tower's tensors.

    Keys may carry any common prefix (``text_model.``, ``cond_stage_model.transformer.text_model.``,
    ``cond_stage_model.model.``, ...). Shapes give vocab, width, context length, number of blocks and MLP width.
    What shapes cannot tell is fixed by the layout, explicitly:

    * ``"hf"`` (``CLIPTextModel`` keys): the CLIP-L family -- ``act="quick_gelu"``, ``output="last"``,
      ``pad_token_id = eos``; ``layers`` = the number of HF layers (all built). A diffusers SD2 / x4 text
      encoder (OpenCLIP-H converted with the last block already dropped: 23 layers, gelu) is also "hf" layout
      but needs ``act="gelu", output="penultimate", pad_token_id=0`` passed as overrides (its config.json says
      ``hidden_act: gelu``); the result then equals ``OPENCLIP_VIT_H14``.
    * ``"openclip"`` (original open_clip keys): ``act="gelu"``, ``output="penultimate"``, ``pad_token_id=0``;
      ``layers`` = checkpoint blocks - 1 (the last block is present but unused).

    Both: ``bos = vocab - 2``, ``eos = vocab - 1`` (49406 / 49407 for the real vocabulary, 254 / 255 for the tiny
    fixtures); ``heads = width // 64`` unless given. ``overrides`` replace any field at the end.
    """
    hf = layout == "hf"
    if layout not in ("hf", "openclip"):
        raise ValueError(f"layout must be 'hf' or 'openclip', got {layout!r}")
    tok_name = "embeddings.token_embedding.weight" if hf else "token_embedding.weight"
    tok = [k for k in shapes if k == tok_name or k.endswith("." + tok_name)]
    if len(tok) != 1:
        raise KeyError(f"expected exactly one '*{tok_name}' key, found {tok}")
    p = tok[0][: -len(tok_name)]  # common prefix
    vocab, width = shapes[tok[0]]
    ctx = shapes[p + ("embeddings.position_embedding.weight" if hf else "positional_embedding")][0]
    block_re = re.compile(re.escape(p) + (r"encoder\.layers\.(\d+)\." if hf else r"transformer\.resblocks\.(\d+)\."))
    n_blocks = 1 + max(int(m.group(1)) for k in shapes if (m := block_re.match(k)))
    mlp = shapes[p + ("encoder.layers.0.mlp.fc1.weight" if hf else "transformer.resblocks.0.mlp.c_fc.weight")][0]
    if heads is None:
        if width % 64:
            raise ValueError(f"width {width} is not a multiple of 64, so the head count is unknown")
        heads = width // 64
    cfg = TextConfig(vocab_size=vocab, width=width, heads=heads, mlp_width=mlp, context_length=ctx,
                     layers=n_blocks if hf else n_blocks - 1, act="quick_gelu" if hf else "gelu",
                     output="last" if hf else "penultimate", pad_token_id=vocab - 1 if hf else 0,
                     bos_token_id=vocab - 2, eos_token_id=vocab - 1)
    return dataclasses.replace(cfg, **overrides)


# ------------------------------------------------------------------------------------------------
# Tokenizer


@lru_cache(maxsize=1)
def _bpe() -> SimpleTokenizer:
    return SimpleTokenizer()  # open_clip's bundled bpe_simple_vocab_16e6.txt.gz, lower-casing + ftfy clean-up


class Tokenizer:
    """CLIP BPE -> ``[49406] + bpe[:context_length - 2] + [49407]``, then padding with ``pad_token_id``.

    ``pad_token_id=0`` is ``open_clip.tokenize`` (SD2 / x4 / StableSR); ``pad_token_id=49407`` is SD1's
    HF ``CLIPTokenizer(padding="max_length", truncation=True, max_length=77)`` convention."""

    def __init__(self, pad_token_id: int, context_length: int = 77):
        self.pad_token_id, self.context_length = pad_token_id, context_length
        self.bpe = _bpe()
        self.bos_token_id, self.eos_token_id = self.bpe.sot_token_id, self.bpe.eot_token_id  # 49406, 49407

    @classmethod
    def for_config(cls, cfg: TextConfig) -> "Tokenizer":
        if cfg.vocab_size != CLIP_VOCAB:
            raise ValueError(f"the CLIP BPE tokenizer needs vocab_size {CLIP_VOCAB}, config has {cfg.vocab_size}")
        return cls(pad_token_id=cfg.pad_token_id, context_length=cfg.context_length)

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = torch.full((len(prompts), self.context_length), self.pad_token_id, dtype=torch.long)  # (B, 77)
        for i, text in enumerate(prompts):
            row = [self.bos_token_id] + self.bpe.encode(text)[: self.context_length - 2] + [self.eos_token_id]
            ids[i, : len(row)] = torch.tensor(row)
        return ids
