"""Speed options applied to a loaded model (``sdup.load(...)``), all opt-in.

    model = sdup.load("x4-upscaler-ema.safetensors")
    fuse_qkv(model)               # one q/k/v Linear per self-attention (what scripts/upscale.py and txt2img.py do)
    compile_model(model)          # torch.compile the UNet forward (and the VAE decoder's), shapes dynamic
    to_memory_format(model)       # conv weights channels_last where that is faster (choose_memory_format)
    use_onednn_linear(model)      # bf16 Linears on the CPU: oneDNN with the bias fused (no per-call copies)
    prepare(model)                # fuse_qkv + use_onednn_linear (CPU) + to_memory_format: what the CLIs do

``fuse_qkv`` concatenates the weights once, at load time (never per call), and keeps the state dict's keys.
``compile_model`` compiles the *forward* of the UNet / VAE decoder in place (the modules, their state dicts and the
key tables stay as they are), with ``dynamic=True`` so that a new latent or tile size does not trigger a
recompile per size (the timestep is a tensor argument, so steps never recompile).  The first call pays the
compilation (minutes for a full-size UNet on a CPU).  On the 2-core AVX2 CPU of docs/bench.md the compiled SD 1.4 UNet
ran at the eager speed (18.81 s vs diffusers' eager 18.79 s; frozen: 18.41 vs 17.91): its time is in oneDNN's
convolutions and GEMMs either way.  Measured with scripts/bench.py; correctness: fused and compiled
== eager within 1e-5 (tests/test_unet_vae.py, tests/test_optimize.py).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn

MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
HALF_DTYPES = (torch.float16, torch.bfloat16)


def compile_model(model, *, unet: bool = True, vae_decoder: bool = True, dynamic: bool | None = True,
                  freeze: bool = False, mode: str | None = None, backend: str = "inductor"):
    """``torch.compile`` the UNet's and the VAE decoder's ``forward`` of a ``LoadedModel`` in place; returns it.
    A bare ``nn.Module`` (a UNet, say) gets its own ``forward`` compiled.

    ``freeze``: inductor's freezing (weights folded into the graph as constants, CPU conv / linear weights
    pre-packed for oneDNN / MKL), with shapes specialised (``dynamic=None``: a second size recompiles once, then
    dynamically). It only takes effect for calls without autograd (the pipelines run under ``inference_mode``), and
    the compiled graph keeps the weights it saw at the first call: edit the weights before compiling, not after.
    """
    options = None
    if freeze:
        dynamic, options = None, {"freezing": True}
    if isinstance(model, nn.Module):
        targets = [model]
    else:
        decoder = getattr(model.vae, "decoder", None)
        targets = [m for m, wanted in ((model.unet, unet), (decoder, vae_decoder)) if wanted and m is not None]
    for module in targets:
        module.forward = torch.compile(module.forward, dynamic=dynamic, mode=mode, backend=backend, options=options)
    return model


def fuse_qkv(model) -> int:
    """Join the q/k/v projections of every self-attention (modules marked ``fusable_qkv``: the UNets' attn1 and the
    K-UNet's SelfAttention2d) into one ``qkv_proj`` Linear with rows [q; k; v], once; returns how many were fused.

    One (N, C) x (C, 3C) matmul instead of three (N, C) x (C, C): measured 1.6x faster for the SD 1.4 level-1
    projections (N 8192, C 320) on a 2-core CPU.  ``state_dict()`` still has the ``q_proj``/``k_proj``/``v_proj``
    keys (split on the way out, joined on the way in), so the key tables, exporters and ``load_state_dict`` are
    unchanged.  ``model``: a ``LoadedModel`` or any ``nn.Module``.
    """
    roots = model.components().values() if hasattr(model, "components") else [model]
    fused = 0
    for root in roots:
        for module in root.modules():
            if getattr(module, "fusable_qkv", False) and getattr(module, "qkv_proj", None) is None:
                _fuse(module)
                fused += 1
    return fused


_QKV = ("q_proj", "k_proj", "v_proj")


def _fuse(module: nn.Module) -> None:
    q, k, v = (getattr(module, name) for name in _QKV)
    qkv = nn.Linear(q.in_features, q.out_features * 3, bias=q.bias is not None, device=q.weight.device,
                    dtype=q.weight.dtype)
    with torch.no_grad():
        qkv.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        if q.bias is not None:
            qkv.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
    for name in _QKV:
        delattr(module, name)
    module.qkv_proj = qkv
    module.register_state_dict_post_hook(_split_qkv_keys)
    module.register_load_state_dict_pre_hook(_join_qkv_keys)


def _split_qkv_keys(module, state_dict, prefix, local_metadata):
    for kind in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}qkv_proj.{kind}", None)
        if fused is not None:
            for name, part in zip(_QKV, fused.chunk(3)):
                state_dict[f"{prefix}{name}.{kind}"] = part


def _join_qkv_keys(module, state_dict, prefix, *args):
    for kind in ("weight", "bias"):
        parts = [f"{prefix}{name}.{kind}" for name in _QKV]
        if all(p in state_dict for p in parts):
            state_dict[f"{prefix}qkv_proj.{kind}"] = torch.cat([state_dict.pop(p) for p in parts])


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (the ``avx512_bf16`` or ``amx_bf16`` flags of /proc/cpuinfo):
    there torch's bf16 matmuls / convolutions run 2x (AVX-512 BF16) to ~10x (AMX) faster than fp32; elsewhere they
    are emulated (~50x slower than fp32 on an AVX2 CPU, docs/bench.md).  False where the flags cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_memory_format(device, dtype: torch.dtype) -> str:
    """The activation / conv-weight layout that is faster for ``dtype`` on ``device``: "channels_last" (NHWC) or
    "contiguous" (NCHW).

    channels_last for fp16 / bf16 on CUDA and on CPUs with native bf16 (``cpu_has_native_bf16``): oneDNN's half
    precision convolutions work in NHWC, so NCHW activations are reordered on every call (docs/bench.md: the
    measurements).  contiguous for fp32 on the CPU (slower in channels_last on a 2-core AVX2 CPU) and anything
    else not measured."""
    device = torch.device(device)
    if dtype in HALF_DTYPES and (device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())):
        return "channels_last"
    return "contiguous"


def to_memory_format(model, memory_format: str = "auto") -> str:
    """Store the 4-d weights (the convolutions') of a ``LoadedModel``'s components or of an ``nn.Module`` in
    ``memory_format`` ("contiguous", "channels_last", or "auto": ``choose_memory_format`` for each component's
    device and dtype, so an fp32 VAE next to a bf16 UNet stays contiguous), in place; returns the format used
    ("unet channels_last, vae contiguous" when the components differ).

    Convolutions whose weight is channels_last produce channels_last outputs from either input layout, so the
    activations follow without converting the inputs; every sdup forward accepts both layouts (the token
    reshapes are views in either) and returns values equal within rounding.  The state dict keeps its keys
    and values (only the strides change)."""
    roots = model.components() if hasattr(model, "components") else {"model": model}
    used = {}
    for name, root in roots.items():
        p = next((q for q in root.parameters() if q.dim() == 4), None)
        if p is None:  # no convolutions (the text encoders)
            continue
        fmt = choose_memory_format(p.device, p.dtype) if memory_format == "auto" else memory_format
        root.to(memory_format=MEMORY_FORMATS[fmt])
        used[name] = fmt
    if len(set(used.values())) <= 1:
        return next(iter(used.values()), "contiguous")
    return ", ".join(f"{name} {fmt}" for name, fmt in used.items())


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose bf16 CPU forward without autograd calls oneDNN's inner product with the bias inside the
    GEMM (``torch.ops.mkldnn._linear_pointwise``, what inductor's CPU freezing emits), instead of ``addmm``.

    ``addmm`` in bf16 first copies the bias broadcast to the whole output (and, for short inputs such as the 77
    text tokens, the transposed weight) with ``aten::copy_``: ~120 copies per x4 UNet forward.  The result is
    bit-identical to ``F.linear`` for contiguous input (measured; fp16 is not supported by oneDNN on CPUs
    without avx512_fp16, so it keeps ``nn.Linear``).  Parameters and state dict are those of ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._onednn(x):
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def _onednn(self, x: torch.Tensor) -> bool:
        grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        bf16_cpu = x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.bfloat16
        return bf16_cpu and not grad and _onednn_has_bf16()


@functools.lru_cache(maxsize=None)
def _onednn_has_bf16() -> bool:
    """oneDNN can run bf16 on this CPU (AVX-512 and newer; on older CPUs ``OneDNNLinear`` stays ``nn.Linear``)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def use_onednn_linear(model) -> int:
    """Turn every ``nn.Linear`` of a ``LoadedModel``'s components (or of an ``nn.Module``) into a ``OneDNNLinear``
    (the class only: parameters, state dict and outputs outside bf16-on-CPU unchanged); returns how many."""
    roots = model.components().values() if hasattr(model, "components") else [model]
    swapped = 0
    for root in roots:
        for module in root.modules():
            if type(module) is nn.Linear:
                module.__class__ = OneDNNLinear
                swapped += 1
    return swapped


def prepare(model, memory_format: str = "auto") -> str:
    """What the CLIs apply after loading (call it once the model is on its device): ``fuse_qkv``,
    ``use_onednn_linear`` for the components on the CPU (a CUDA model keeps ``nn.Linear``: OneDNNLinear is a CPU
    path, elsewhere only a per-call check) and ``to_memory_format``; returns the memory format used (recorded in the
    output parameters)."""
    fuse_qkv(model)
    roots = model.components().values() if hasattr(model, "components") else [model]
    for root in roots:
        p = next(root.parameters(), None)
        if p is not None and p.device.type == "cpu":
            use_onednn_linear(root)
    return to_memory_format(model, memory_format)
