"""The sampling grids of the LDM networks (x4 upscaler, SD 1.x / 2.x) and the denoiser that runs on them.

    discrete_timesteps(steps)            DDIM / PLMS / DDPM timesteps: LDM's uniform grid = diffusers' "leading"
    sigma_grid(sampler, ac, steps)       diffusers' "linspace" sigma grid for the sigma samplers
    ldm_grid(sampler, net, schedule, prediction, steps, device)
                                         (denoiser, grid, init_scale, record) for a raw eps / v network

The schedules themselves (betas, alphas, spacings, sigma interpolation) are in ``schedules``; this module picks the
reference's grid for a sampler.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .denoisers import CompVisDenoiser, DiscreteDenoiser
from .samplers import Sampler
from .schedules import discrete_sigmas, schedule_betas, spaced_timesteps

Tensor = torch.Tensor


def discrete_timesteps(steps: int, T: int = 1000, offset: int = 1) -> Tensor:
    """The DDIM / PLMS / DDPM grid, descending: ``t_i = i * (T // steps) + offset`` for i < steps.

    This is the first ``steps`` entries of the LDM uniform grid (``ddim_timesteps``) = diffusers' "leading"
    spacing with ``steps_offset=1``: identical to CompVis whenever its grid has exactly ``steps`` entries
    (10, 20, 25, 50, 100, 200, 250, 500, 1000, ...). For other counts CompVis runs a few extra steps (75 -> 77) or
    fails (3, 9, ...: it would index t = 1000); sdup, like diffusers, runs exactly ``steps``. At most ``T - offset``
    steps (999): with one step per timestep the grid would end at t = T, past the schedule."""
    if not 1 <= steps <= T - offset:
        raise ValueError(f"steps must be in 1..{T - offset} for this sampler, got {steps}")
    return spaced_timesteps(steps, "leading", T, offset).long()


def sigma_grid(spec: Sampler, alphas_cumprod: Tensor, steps: int) -> Tensor:
    """diffusers' default grid for the sigma samplers ("linspace" spacing, interpolated linearly in sigma over the
    training sigmas, final sigma 0; DPM-Solver's own n+1-point variant for dpmpp_2m)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return discrete_sigmas(alphas_cumprod, steps, "linspace", dpm_solver=spec.name == "dpmpp_2m")[0]


def ldm_grid(sampler: Sampler, raw: Callable, schedule: dict, prediction: str, steps: int, device):
    """(denoiser, grid, init_scale, record) of an LDM network (eps or v; x4, txt2img) on the reference grids.
    Discrete samplers: ``DiscreteDenoiser`` on the LDM / diffusers "leading" timesteps (DDPM: the chain respaced to
    them).  Sigma samplers: ``CompVisDenoiser`` on diffusers' "linspace" sigma grid, t(sigma) by linear
    interpolation (so the network gets diffusers' timesteps exactly); the start is x_T * sigma_max (diffusers'
    ``init_noise_sigma``) or x_T * sqrt(sigma_max^2 + 1) for DPM++ (diffusers' DPM-Solver starts in the
    variance-preserving scale).  ``record``: the timesteps for the parameters (``finish`` records sigmas)."""
    den = DiscreteDenoiser(raw, schedule_betas(schedule), prediction)
    if sampler.discrete:
        ts = discrete_timesteps(steps, den.num_timesteps)
        record = {"timesteps": ts.tolist()}
        if sampler.name == "ddpm":
            return den.respaced(ts.tolist()), None, 1.0, record
        return den, ts, 1.0, record
    sigmas = sigma_grid(sampler, den.alphas_cumprod, steps)
    s0 = float(sigmas[0])
    kd = CompVisDenoiser(raw, den.alphas_cumprod, prediction, interpolation="linear")
    return kd, sigmas.to(device), math.sqrt(s0 ** 2 + 1) if sampler.name == "dpmpp_2m" else s0, {}
