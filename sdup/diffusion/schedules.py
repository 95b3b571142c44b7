"""Noise schedules and timestep / sigma grids of the upstream code (CompVis, SAI, StableSR) and of diffusers.

Plain functions on 1-D tensors.  Conventions:

* ``betas`` / ``alphas_cumprod`` tables are indexed by the training timestep ``t = 0 .. T-1``.
* The upstream (LDM) tables are computed in float64 and stored as float32: ``ldm_linear_betas`` returns
  float64, ``ldm_buffers`` returns the 12 float32 ``register_schedule`` buffers.
* sigma (k-diffusion / diffusers "VE" view): ``sigma_t = sqrt((1 - ac_t) / ac_t)``, ``x_ve = x_vp * sqrt(sigma^2 + 1)``.
* Grids returned for sampling are in *visiting order* (descending noise); sigma grids carry the final
  sigma (0 by default) so that ``len(sigmas) == steps + 1``.
* Grids that diffusers computes with NumPy (``np.linspace`` timesteps, ``np.interp`` sigmas) are computed here with
  the same NumPy calls, and the float32 tables with the same torch ops: on one machine the two agree bit for bit.
  Across machines they need not: torch's CPU ``sqrt`` (also behind ``x ** 0.5``) and ``exp``/``log`` call Intel
  MKL's vector math, which is not correctly rounded and picks its code path from the CPU model, so a float32 grid
  made on one CPU can differ from another's by one ulp in some elements.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

Tensor = torch.Tensor

# ------------------------------------------------------------------------------------------------
# training schedules


def ldm_linear_betas(start: float = 0.00085, end: float = 0.012, T: int = 1000) -> Tensor:
    """LDM ``make_beta_schedule("linear")`` = diffusers ``scaled_linear``: linear in sqrt(beta), float64."""
    return torch.linspace(start ** 0.5, end ** 0.5, T, dtype=torch.float64) ** 2


def diffusers_alphas_cumprod(start: float = 0.00085, end: float = 0.012, T: int = 1000,
                             beta_schedule: str = "scaled_linear") -> Tensor:
    """alphas_cumprod exactly as diffusers schedulers build it (float32 throughout; differs from the LDM table by
    ~1e-7 relative).  Use it to reproduce diffusers sigma grids bit for bit (x2 latent upscaler)."""
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(start ** 0.5, end ** 0.5, T, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(start, end, T, dtype=torch.float32)
    else:
        raise ValueError(f"unsupported beta_schedule {beta_schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0)


def alphas_cumprod(betas: Tensor) -> Tensor:
    """prod_{s<=t} (1 - beta_s), in the dtype of ``betas``."""
    return torch.cumprod(1.0 - betas, dim=0)


def ldm_buffers(betas: Tensor, v_posterior: float = 0.0) -> dict[str, Tensor]:
    """The 12 buffers of LDM ``DDPM.register_schedule``, returned float32.

    Follows upstream's NumPy arithmetic dtype for dtype: everything in the dtype of ``betas`` (float64 for
    ``make_beta_schedule``; float32 for StableSR's ``given_betas`` rebuilt from the float32 model buffer), except
    that ``alphas_cumprod_prev = np.append(1., ...)`` is float64 and promotes the posterior terms to float64.
    """
    b = betas.cpu()
    alphas = 1.0 - b
    ac = _cumprod_sequential(alphas)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1].double()])
    post_var = (1 - v_posterior) * b * (1.0 - ac_prev) / (1.0 - ac) + v_posterior * b
    out = {
        "betas": b,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": b * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: v.float() for k, v in out.items()}


def _cumprod_sequential(a: Tensor) -> Tensor:
    """``np.cumprod``: rounded to the dtype after every product (torch's CPU cumprod accumulates float32 in
    float64, which differs in the last bit from upstream's float32 NumPy tables)."""
    if a.dtype == torch.float64:
        return torch.cumprod(a, dim=0)
    out, p = torch.empty_like(a), a.new_ones(())
    for i in range(a.shape[0]):
        p = p * a[i]
        out[i] = p
    return out


def schedule_betas(schedule: dict) -> Tensor:
    """float64 betas from an ``sdup.load(...).schedule`` dict (LDM "linear" = scaled_linear)."""
    return ldm_linear_betas(schedule.get("linear_start", 0.00085), schedule.get("linear_end", 0.012),
                            schedule.get("timesteps", 1000))


def q_sample(x0: Tensor, t: Tensor | int, noise: Tensor, buffers: dict[str, Tensor]) -> Tensor:
    """Forward diffusion ``sqrt(ac_t) x0 + sqrt(1 - ac_t) noise`` with LDM buffers (x4 noise augmentation)."""
    t = torch.as_tensor(t, device=x0.device).long().reshape(-1)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a = buffers["sqrt_alphas_cumprod"].to(x0.device)[t].reshape(shape).to(x0.dtype)
    s = buffers["sqrt_one_minus_alphas_cumprod"].to(x0.device)[t].reshape(shape).to(x0.dtype)
    return a * x0 + s * noise


# ------------------------------------------------------------------------------------------------
# DDIM / PLMS grids (LDM) and guided-diffusion respacing (StableSR DDPM)


def ddim_timesteps(num_steps: int, T: int = 1000, offset: int = 1) -> Tensor:
    """LDM ``make_ddim_timesteps("uniform")``: ``range(0, T, T // S) + offset``, ascending int64.

    ``offset=1`` is CompVis / SAI (1, 101, ..., 901 for S=10); StableSR's copy has no ``+1`` (``offset=0``).
    As upstream, when S does not divide T this yields more than S steps (S=75 -> 77 steps); diffusers'
    ``leading`` spacing keeps only the first S.  Where upstream would index t = T (c divides T - 1: S = 3, 9, 27,
    37, ... with offset 1) this raises ValueError.  Sample over ``ddim_timesteps(...).flip(0)``.
    """
    c = T // num_steps
    ts = torch.arange(0, T, c, dtype=torch.int64) + offset
    if ts[-1] >= T:  # e.g. S = 3, 9, 27, 37 with offset 1: upstream raises an IndexError here too
        raise ValueError(f"the upstream uniform DDIM grid for {num_steps} steps reaches t={int(ts[-1])} >= {T}; "
                         f"use spaced_timesteps({num_steps}, 'leading', steps_offset={offset}) (diffusers) instead")
    return ts


def ddim_parameters(alphas_cumprod: Tensor, timesteps: Sequence[int] | Tensor, eta: float = 0.0,
                    final_alpha_cumprod: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step (alpha, alpha_prev, sigma) for the *visiting order* ``timesteps`` (descending), float64.

    alpha = ac[t_i]; alpha_prev = ac[t_{i+1}], and ``final_alpha_cumprod`` (default ``ac[0]``, as upstream and
    diffusers ``set_alpha_to_one=False``) for the last step; sigma = eta sqrt((1-a_prev)/(1-a) (1 - a/a_prev)).
    Flip the results to get upstream's ``ddim_alphas`` / ``ddim_alphas_prev`` / ``ddim_sigmas`` order.
    """
    ac = alphas_cumprod.double().cpu()
    ts = torch.as_tensor(timesteps).long().cpu()
    final = ac[0] if final_alpha_cumprod is None else torch.tensor(float(final_alpha_cumprod), dtype=torch.float64)
    a = ac[ts]
    a_prev = torch.cat([ac[ts[1:]], final.reshape(1)])
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    return a, a_prev, sigma


def space_timesteps(num_timesteps: int, section_counts: Sequence[int] | str) -> list[int]:
    """guided-diffusion ``space_timesteps`` (as copied by StableSR), bit-exact; returns the sorted list.

    ``[N]`` -> round(i * (T-1)/(N-1)) with the float stride accumulated like upstream; ``"ddimN"`` -> the
    integer stride that yields exactly N steps; ``"a,b,c"`` -> per-section counts.  Upstream returns a set.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired:
                    return sorted(set(range(0, num_timesteps, i)))
            raise ValueError(f"cannot create exactly {num_timesteps} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def respaced_betas(alphas_cumprod: Tensor, use_timesteps: Iterable[int]) -> Tensor:
    """Betas of the respaced chain: ``1 - ac[t_k] / ac[t_{k-1}]`` (``ac[t_{-1}] := 1``), so that the new
    cumulative product equals ``ac[t_k]``.  Computed in the dtype of ``alphas_cumprod`` (StableSR passes the
    float32 model buffer)."""
    ts = torch.as_tensor(sorted(set(int(t) for t in use_timesteps)), dtype=torch.long)
    ac = alphas_cumprod[ts]
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    return 1 - ac / prev


# ------------------------------------------------------------------------------------------------
# sigma grids (k-diffusion / diffusers)


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """Training sigmas ``sqrt((1 - ac) / ac)``, ascending in t, in the dtype of ``alphas_cumprod`` (both
    k-diffusion and diffusers compute them from the float32 table)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def append_zero(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) grid of n sigmas (computed in float64, returned float32) plus a final 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho).float()


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """exp(linspace(log sigma_max, log sigma_min, n)) plus a final 0 (k-diffusion ``get_sigmas_exponential``)."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()).float()


def spaced_timesteps(n: int, spacing: str = "linspace", T: int = 1000, steps_offset: int = 0, *,
                     dpm_solver: bool = False) -> Tensor:
    """diffusers ``set_timesteps`` grids, descending, float64 (integers except ``linspace`` of Euler/LMS).

    ``linspace``: linspace(0, T-1, n); ``leading``: arange(n) * (T // n) + offset; ``trailing``:
    round(arange(T, 0, -T/n)) - 1.  ``dpm_solver=True`` reproduces DPMSolverMultistepScheduler, which builds
    n+1 points and drops the last: round(linspace(0, T-1, n+1)), arange(n+1) * (T // (n+1)) + offset.
    """
    if spacing == "linspace":
        if dpm_solver:
            ts = torch.from_numpy(np.linspace(0, T - 1, n + 1).round()).flip(0)[:-1]
        else:  # diffusers rounds this one to float32
            ts = torch.from_numpy(np.linspace(0, T - 1, n, dtype=np.float32)).double().flip(0)
    elif spacing == "leading":
        if dpm_solver:
            ts = (torch.arange(n + 1, dtype=torch.float64) * (T // (n + 1))).flip(0)[:-1]
        else:
            ts = (torch.arange(n, dtype=torch.float64) * (T // n)).flip(0)
        ts = ts + steps_offset
    elif spacing == "trailing":
        ts = torch.from_numpy(np.arange(T, 0, -T / n).round() - 1)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r} (linspace, leading, trailing)")
    return ts


def interp_sigmas(sigmas_train: Tensor, timesteps: Tensor) -> Tensor:
    """Sigma at fractional timesteps, linear in sigma between the training sigmas (diffusers' ``np.interp``), float64."""
    s = sigmas_train.double().cpu().numpy()
    return torch.from_numpy(np.interp(timesteps.double().cpu().numpy(), np.arange(len(s)), s))


def discrete_sigmas(alphas_cumprod: Tensor, n: int, spacing: str = "linspace", steps_offset: int = 0, *,
                    final_sigma: str = "zero", dpm_solver: bool = False) -> tuple[Tensor, Tensor]:
    """diffusers Euler / Euler-ancestral / LMS (``dpm_solver=True``: DPMSolverMultistep) sigma grid.

    Returns ``(sigmas, timesteps)``: ``sigmas`` float32 of length n+1 (sigma at each timestep, interpolated
    linearly in sigma over the training sigmas, then ``final_sigma`` = "zero" or "sigma_min"), ``timesteps``
    float64 of length n (the grid the diffusers UNet receives).
    """
    sig_train = sigmas_from_alphas_cumprod(alphas_cumprod.float())
    ts = spaced_timesteps(n, spacing, len(alphas_cumprod), steps_offset, dpm_solver=dpm_solver)
    sig = interp_sigmas(sig_train, ts)
    if final_sigma == "zero":
        last = 0.0
    elif final_sigma == "sigma_min":
        last = float(sig_train[0])
    else:
        raise ValueError(f"final_sigma must be 'zero' or 'sigma_min', got {final_sigma!r}")
    return torch.cat([sig, torch.tensor([last], dtype=torch.float64)]).float(), ts


def init_noise_sigma(sigmas: Tensor, spacing: str = "linspace") -> float:
    """diffusers Euler/LMS ``init_noise_sigma``: sigma_max for linspace/trailing, sqrt(sigma_max^2+1) for leading."""
    smax = float(sigmas.max())
    return smax if spacing in ("linspace", "trailing") else (smax ** 2 + 1) ** 0.5
