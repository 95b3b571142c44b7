"""Noise schedules, model wrappers (denoisers, classifier-free guidance) and samplers."""
from .denoisers import CFG, CompVisDenoiser, DiffusionWrapper, DiscreteDenoiser, KarrasDenoiser
from .samplers import (DISCRETE_SAMPLERS, SAMPLER_NAMES, SAMPLERS, SIGMA_SAMPLERS, Sampler, get_sampler, randn,
                       sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler,
                       sample_euler_ancestral, sample_lms, sample_plms)
from .schedules import (ddim_parameters, ddim_timesteps, discrete_sigmas, karras_sigmas, ldm_buffers, ldm_linear_betas,
                        q_sample, respaced_betas, schedule_betas, sigmas_from_alphas_cumprod, space_timesteps)

__all__ = [
    "CFG", "CompVisDenoiser", "DiffusionWrapper", "DiscreteDenoiser", "KarrasDenoiser",
    "DISCRETE_SAMPLERS", "SAMPLER_NAMES", "SAMPLERS", "SIGMA_SAMPLERS", "Sampler", "get_sampler", "randn", "sample_ddim", "sample_ddpm", "sample_dpmpp_2m", "sample_euler",
    "sample_euler_ancestral", "sample_lms", "sample_plms",
    "ddim_parameters", "ddim_timesteps", "discrete_sigmas", "karras_sigmas", "ldm_buffers", "ldm_linear_betas",
    "q_sample", "respaced_betas", "schedule_betas", "sigmas_from_alphas_cumprod", "space_timesteps",
]
