"""What every loader shares: the ``LoadedModel`` record, the per-family constants, and ``Build``, which turns mapped
tensors into modules one tensor at a time (cast to the load's dtype and device as each is mapped, its source's
memory given back at once, modules built on the meta device and adopting the tensors)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from .io import CheckpointError, Sources
from .keymap import KeyMap, KeyMismatch

# What the weights cannot tell: per-family inference constants, from the upstream YAML configs (SD1
# v1-inference.yaml, SD2 v2-inference.yaml, x4-upscaling.yaml, StableSR v2-finetune_text_T_512.yaml) and the
# x2 notebook / diffusers scheduler config; a YAML passed to ``load`` overrides them.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "sd1": dict(prediction="eps", scale_factor=0.18215, linear_start=0.00085, linear_end=0.012),
    "sd2": dict(prediction="eps", scale_factor=0.18215, linear_start=0.00085, linear_end=0.012),
    "x4": dict(prediction="v", scale_factor=0.08333, linear_start=0.0001, linear_end=0.02, max_noise_level=350,
               noise_linear_start=0.0001, noise_linear_end=0.02),
    "stablesr": dict(prediction="eps", scale_factor=0.18215, linear_start=0.00085, linear_end=0.012),
    "x2": dict(prediction="sample", scale_factor=0.18215, linear_start=0.00085, linear_end=0.012),
    "stablesr_cfw_vae": dict(scale_factor=0.18215),
    "vae": dict(scale_factor=0.18215),
}
HALF = (torch.float16, torch.bfloat16)


@dataclass
class LoadedModel:
    family: str
    source: str
    unet: nn.Module | None = None
    vae: nn.Module | None = None
    text_encoder: nn.Module | None = None
    tokenizer: Any = None
    struct_encoder: nn.Module | None = None   # StableSR time-aware encoder
    prediction: str | None = None             # eps | v | sample (x2: the pipeline preconditions)
    scale_factor: float = 0.18215             # latent = scale_factor * vae latent
    schedule: dict = field(default_factory=dict)   # linear_start, linear_end, timesteps (+ x4 noise augmentation)
    configs: dict = field(default_factory=dict)    # component -> config dataclass
    report: dict = field(default_factory=dict)     # component -> number of tensors loaded; "dropped" -> {reason: n}
    dropped: dict = field(default_factory=dict, repr=False)  # reason -> the file's keys dropped for it
    keymaps: dict = field(default_factory=dict, repr=False)  # component -> the KeyMap it was loaded with, full
    # names on both sides ("unet.conv_in.weight" <-> "model.diffusion_model.input_blocks.0.0.weight"); empty for
    # sdup files. With ema=True the UNet's map names the model_ema.* copies it read (ldm.ema_key).

    def components(self) -> dict[str, nn.Module]:
        return {k: getattr(self, k) for k in ("unet", "vae", "text_encoder", "struct_encoder") if getattr(self, k) is not None}


def check_shapes(module: nn.Module, sd: dict) -> None:
    """One line instead of torch's page of size mismatches: the configured architecture (a YAML for another size
    of model, say) does not fit the weights."""
    own = module.state_dict()
    bad = [k for k, v in sd.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(f"{type(module).__name__}: {len(bad)} tensors have other shapes than the configured "
                              f"model, e.g. {k}: {tuple(sd[k].shape)} in the weights, {tuple(own[k].shape)} configured "
                              f"(a --config for another size or family of model?)")


def meta_keys(factory) -> list[str]:
    with torch.device("meta"):
        return list(factory().state_dict())


def shapes_of(sd: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def tokenizer_for(cfg):
    """The CLIP BPE tokenizer for real-vocabulary encoders; None for the tiny test encoders (256 ids)."""
    from ..models.text import CLIP_VOCAB, Tokenizer
    return Tokenizer.for_config(cfg) if cfg.vocab_size == CLIP_VOCAB else None


class Build:
    """Per-load settings: device/dtype, strictness, the report being filled, and the file tensors to give back.

    ``strict=False`` (used by ``inspect``) records missing/unexpected keys per component instead of
    raising, and loads what matches. ``device="meta"`` builds everything without memory (shapes only).
    The VAE stays fp32 when the rest is fp16/bf16 (the x4 VAE overflows in half precision).
    """

    def __init__(self, device, dtype, strict: bool = True, sources: Sources | None = None):
        self.device, self.dtype, self.strict = torch.device(device), dtype, strict
        self.sources = sources or Sources()
        self.report: dict = {}
        self.keymaps: dict[str, KeyMap] = {}
        self.dropped: dict[str, list[str]] = {}

    def model(self, family: str, source: str, **fields) -> LoadedModel:
        return LoadedModel(family=family, source=source, report=self.report, dropped=self.dropped,
                           keymaps=self.keymaps, **fields)

    def drop(self, reason: str, keys) -> None:
        """Record keys of the file that are dropped on purpose (nothing if ``keys`` is empty)."""
        keys = list(keys)
        if keys:
            self.dropped[reason] = keys
            self.report.setdefault("dropped", {})[reason] = len(keys)

    def dtype_of(self, comp: str):
        return None if comp == "vae" and self.dtype in HALF else self.dtype

    def convert(self, sources: list, tensors: list, comp: str) -> list:
        """``tensors`` (made from ``sources``) at the load's device and the component's dtype (floating point
        only, as ``Module.to``); every source no result shares memory with is given back."""
        dtype = self.dtype_of(comp)
        out = [t.to(self.device, dtype if dtype is not None and (t.is_floating_point() or t.is_complex()) else None)
               for t in tensors]
        kept = {t.untyped_storage().data_ptr() for t in out if t.device.type == "cpu"}
        for s in sources:
            if s.device.type != "cpu" or s.untyped_storage().data_ptr() not in kept:
                self.sources.release(s)
        return out

    def map(self, km: KeyMap, ext: dict, what: str, ignore=lambda k: False, *, comp: str, prefix: str = "") -> dict:
        """``km.to_sdup`` on one component's tensors (external names without ``prefix``), converted entry by entry;
        records the map."""
        self.keymaps[comp] = km.with_prefix(f"{comp}.", prefix)
        convert = lambda src, tensors: self.convert(src, tensors, comp)  # noqa: E731
        try:
            return km.to_sdup(ext, what, ignore=ignore, convert=convert)
        except KeyMismatch as e:
            if self.strict:
                raise
            self.report.setdefault("mismatch", {})[what] = {"missing": e.missing, "unexpected": e.unexpected}
            return km.to_sdup(ext, what, ignore=ignore, strict=False, convert=convert)

    def module(self, comp: str, factory: Callable[[], nn.Module], sd: dict) -> nn.Module:
        """Build on the meta device and adopt the loaded tensors (no random init of 1B parameters), converting
        any not converted yet. Non-persistent buffers (causal masks, fixed kernels) are recomputed by the modules'
        ``init_buffers``; a module without one is built normally instead."""
        with torch.device("meta"):
            module = factory()
        check_shapes(module, sd)
        sd = {k: self.convert([v], [v], comp)[0] for k, v in sd.items()}
        module.load_state_dict(sd, strict=self.strict, assign=True)
        if self.device.type != "meta":
            for m in module.modules():
                if hasattr(m, "init_buffers"):
                    m.init_buffers()
            if any(t.is_meta for t in module.buffers()):
                module = factory()
                module.load_state_dict(sd, strict=self.strict)
        dtype = self.dtype_of(comp)
        module = module.to(device=self.device, dtype=dtype) if dtype is not None else module.to(self.device)
        return module.eval().requires_grad_(False)

    def load(self, comp: str, factory: Callable[[], nn.Module], km: KeyMap, ext: dict, what: str,
             ignore=lambda k: False, prefix: str = "") -> nn.Module:
        """``module(comp, factory, map(km, ext, ...))``."""
        return self.module(comp, factory, self.map(km, ext, what, ignore, comp=comp, prefix=prefix))
