"""Building blocks shared by the LDM UNet, the VAE and StableSR."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention, attention_layer, merge_heads, project_qkv, split_heads


def timestep_embedding(t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim).

    LDM UNets (``openaimodel.timestep_embedding``): cos first, f_i = exp(-ln(1e4) i / half)
    -> ``flip_sin_to_cos=True, downscale_freq_shift=0`` (the defaults).
    The LDM VAE / diffusers default: sin first, f_i = exp(-ln(1e4) i / (half - 1))
    -> ``flip_sin_to_cos=False, downscale_freq_shift=1``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = t[:, None].float() * freqs[None]
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


SMALL_MAP_POSITIONS = 512  # see Conv2d
_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # torch < 2.3 has no is_compiling


class Conv2d(nn.Conv2d):
    """``nn.Conv2d``, except that fp32 convolutions on the CPU with few output positions (batch x H x W <= 512:
    the 8x8 and 16x16 levels of the UNets) skip oneDNN for PyTorch's im2col + BLAS kernel (``_slow_conv2d_forward``,
    what ``nn.Conv2d`` itself runs with oneDNN switched off; called directly, so no global switch is touched).

    oneDNN's fp32 kernels starve on such maps: measured on a 2-core AVX2 CPU, a 1280->1280 3x3 at 8x8, batch 2 took
    72 ms with oneDNN and 39 ms without (2560->1280: 194 vs 94 ms); from about 1024 positions on oneDNN is as fast
    or faster (32x32, batch 2: 109 vs 170 ms), so larger maps, GPUs, half types and compiled graphs keep the default.
    The weights, the state dict and the arithmetic (one fp32 GEMM per sample) are those of ``nn.Conv2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _compiling() or x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
            return super().forward(x)
        plain = self.groups == 1 and self.dilation == (1, 1) and self.padding_mode == "zeros" \
            and not isinstance(self.padding, str)
        if not plain or x.shape[0] * x.shape[-2] * x.shape[-1] // (self.stride[0] * self.stride[1]) > SMALL_MAP_POSITIONS:
            return super().forward(x)
        return torch.ops.aten._slow_conv2d_forward(x, self.weight, self.kernel_size, self.bias, self.stride, self.padding)


def group_norm_fp32(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.group_norm`` with fp32 statistics whatever the dtype of ``x`` (the LDM code casts to fp32 and back around
    every norm), returned in ``x.dtype``.

    torch's CPU and CUDA group_norm kernels already accumulate fp16 / bf16 input in fp32 (mean, variance and the
    normalisation in fp32, one rounding of the output), so half-precision input whose weights have its dtype goes
    to the kernel directly: no fp32 copies of the activation and the weights per call.  Against the cast-and-back
    path on (2, 512, 32, 32) maps the outputs differ by one bf16 / fp16 ulp in ~1e-5 of the elements.  The explicit
    fp32 round trip remains for mixed dtypes (fp32 weights, half input) and other devices; fp32 input with fp32
    weights makes the same call as before (bit-identical)."""
    same_dtype = weight is None or weight.dtype == x.dtype
    half_kernel = x.dtype in (torch.float16, torch.bfloat16) and x.device.type in ("cpu", "cuda")
    if same_dtype and (x.dtype == torch.float32 or half_kernel):
        return F.group_norm(x, num_groups, weight, bias, eps)
    weight = weight.float() if weight is not None else None
    bias = bias.float() if bias is not None else None
    return F.group_norm(x.float(), num_groups, weight, bias, eps).to(x.dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with fp32 statistics, output in the input's dtype (``group_norm_fp32``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_fp32(x, self.num_groups, self.weight, self.bias, self.eps)


def group_norm(channels: int, eps: float, groups: int = 32, affine: bool = True) -> GroupNorm32:
    return GroupNorm32(groups, channels, eps=eps, affine=affine)


class Downsample(nn.Module):
    """Stride-2 3x3 conv. UNet: symmetric padding 1. VAE: pad (0,1,0,1) with zeros then padding 0."""

    def __init__(self, channels: int, out_channels: int | None = None, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = Conv2d(channels, out_channels or channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def forward(self, x):
        if self.asymmetric_pad:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """GN-SiLU-conv, (+ time embedding), GN-SiLU-conv, (+ feature modulation), + skip.

    Used by the UNet (``emb_dim`` set, eps 1e-5) and the VAE (``emb_dim=None``, eps 1e-6).
    ``feature_mod`` is the per-resolution conditioning hook: a module called as
    ``feature_mod(h, cond_map)`` on the block's residual branch before the skip is added
    (StableSR plugs its SFT/SPADE layer in here). It is ``None`` for the plain models.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int | None = None, eps: float = 1e-5):
        super().__init__()
        self.norm1 = group_norm(in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(emb_dim, out_channels) if emb_dim else None
        self.norm2 = group_norm(out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.feature_mod: nn.Module | None = None

    def forward(self, x, emb=None, cond_map=None):
        return self.second(x, self.first(x, emb), cond_map)

    def first(self, x, emb=None):
        """The residual branch up to the input of its second GroupNorm."""
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_proj is not None:
            h = h + self.time_proj(F.silu(emb))[:, :, None, None]
        return h

    def second(self, x, h, cond_map=None):
        """The rest of the block from ``h = first(x)`` (the tiled VAE resumes a tile here)."""
        h = self.conv2(F.silu(self.norm2(h)))  # (dropout is 0 in every released config)
        if self.feature_mod is not None:
            h = self.feature_mod(h, cond_map)
        return (x if self.skip is None else self.skip(x)) + h


@attention_layer
class Attention(nn.Module):
    """Multi-head attention on token sequences (B, N, C); ``context`` switches it to cross-attention.

    LDM ``CrossAttention``: q/k/v without bias, output projection with bias.  ``fusable_qkv``: a self-attention
    module (q, k and v all read ``x``), whose three projections ``sdup.optimize.fuse_qkv`` may join into one.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None = None, qkv_bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.fusable_qkv = context_dim is None
        self.q_proj = nn.Linear(dim, inner, bias=qkv_bias)
        self.k_proj = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.v_proj = nn.Linear(context_dim or dim, inner, bias=qkv_bias)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, x, context=None):
        q, k, v = (split_heads(t, self.heads) for t in project_qkv(self, x, context))  # (B, H, N|M, D)
        return self.out_proj(merge_heads(attention(q, k, v, layer=self)))


class GEGLU(nn.Module):
    """proj to 2*inner, split into (value, gate), value * gelu(gate); then back to dim."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.proj_in = nn.Linear(dim, inner * 2)
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x):
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(value * F.gelu(gate))


class TransformerBlock(nn.Module):
    """x += attn1(LN x) [self, or cross when self-attention is disabled]; x += attn2(LN x, ctx); x += FF(LN x)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, self_attn_reads_context: bool = False):
        super().__init__()
        self.self_attn_reads_context = self_attn_reads_context
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, context_dim if self_attn_reads_context else None)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x), context if self.self_attn_reads_context else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GN(eps 1e-6) -> proj_in -> transformer blocks on (B, H*W, C) tokens -> proj_out, + input.

    ``linear_proj``: SD2/x4/StableSR use Linear projections on tokens; SD1 uses 1x1 convs.
    Both are stored as Linear weights (C, C) here; the SD1 loader reshapes the 1x1 convs.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, depth: int = 1,
                 self_attn_reads_context: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.blocks = nn.ModuleList(
            TransformerBlock(inner, heads, dim_head, context_dim, self_attn_reads_context) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x, context):
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        tokens = self.proj_in(tokens)
        for block in self.blocks:
            tokens = block(tokens, context)
        tokens = self.proj_out(tokens)
        return x + tokens.transpose(1, 2).reshape(b, c, h, w)
