"""What every pipeline returns (``Result``) and the dtype names it records and takes on the command line."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # command-line names


@dataclass
class Result:
    images: Tensor                 # (B, 3, H, W) float32 in [0, 1], on the CPU
    latents: Tensor                # (B, C, h, w) float32 sampler output (scaled latents)
    parameters: dict = field(default_factory=dict)

    def sample_parameters(self, i: int) -> dict:
        """The parameters of sample i alone (its seed, prompt, noise level), for per-image metadata."""
        p = dict(self.parameters)
        for key in ("prompt", "negative_prompt", "seed", "noise_level"):
            if isinstance(p.get(key + "s"), list):
                p[key] = p.pop(key + "s")[i]
        p["batch_index"] = i
        return p


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> "float16" (what the parameters record)."""
    return str(dtype).replace("torch.", "")
