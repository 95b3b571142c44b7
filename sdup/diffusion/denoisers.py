"""Model wrappers: raw network -> what the samplers need (discrete eps / v denoisers, Karras preconditioning, CFG).

A *raw model* is any callable ``model(x, t, **cond) -> out`` (``out`` = eps, v, or the K-UNet's F).
The wrappers compose:

    raw = DiffusionWrapper(unet)                      # handles ``concat=`` (x4 low-res image, channels after x)
    raw = CFG(raw, scale)                             # call with cond={...}, uncond={...}; guidance on the raw output
    discrete = DiscreteDenoiser(raw, betas, "eps")    # (eps, x0) at integer t: DDIM / PLMS / DDPM
    karras = CompVisDenoiser(raw, alphas_cumprod, "v")  # D(x, sigma): Euler / LMS / DPM++ / ...
    x2 = CFG(KarrasDenoiser(kunet_fn), scale)        # x2 latent upscaler: guidance on the denoised D

Samplers call the outermost wrapper as ``model(x, t_or_sigma, **extra_args)``; ``extra_args`` are forwarded
untouched, so with ``CFG`` they are ``dict(cond=..., uncond=...)`` and without it the raw model's kwargs.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .schedules import ldm_buffers, respaced_betas, schedule_betas, sigmas_from_alphas_cumprod

Tensor = torch.Tensor
PREDICTIONS = ("eps", "v")


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dims."""
    return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def _per_sample(value, x: Tensor) -> Tensor:
    """Scalar / 0-d / (B,) timestep or sigma -> float or long (B,) tensor on x's device."""
    v = torch.as_tensor(value, device=x.device)
    return v.reshape(-1).expand(x.shape[0]) if v.numel() == 1 else v


# ------------------------------------------------------------------------------------------------
# raw-model helpers


class DiffusionWrapper:
    """LDM ``DiffusionWrapper`` for sdup UNets: ``unet(cat([x, concat], 1), t, context, y=y, features=features)``.

    Conditioning kwargs: ``context`` (text, B x 77 x D), ``concat`` (x4: the noise-augmented low-res image,
    concatenated after the latent channels), ``y`` (x4: noise level class label), ``features`` (StableSR
    time-aware encoder output ``{width: tensor}``).  Unused ones may be omitted.
    """

    def __init__(self, unet: Callable):
        self.unet = unet

    def __call__(self, x: Tensor, t: Tensor, context=None, concat=None, y=None, features=None) -> Tensor:
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        kwargs = {}
        if y is not None:
            kwargs["y"] = y
        if features is not None:
            kwargs["features"] = features
        return self.unet(x, t, context, **kwargs)


def _batch_cat(u: Any, c: Any) -> Any:
    """Concatenate unconditional and conditional inputs along the batch (recursing into dicts / lists)."""
    if isinstance(c, Tensor):
        u = c if u is None else u
        return torch.cat([u.to(c.dtype), c]) if c.ndim else c
    if isinstance(c, dict):
        u = u or {}
        return {k: _batch_cat(u.get(k, v), v) for k, v in c.items()}
    if isinstance(c, (list, tuple)):
        u = u or c
        return type(c)(_batch_cat(a, b) for a, b in zip(u, c))
    return c  # None, numbers, strings: shared


class CFG:
    """Classifier-free guidance: ``out = u + scale * (c - u)`` from ONE batched call on ``[uncond, cond]``.

    ``CFG(inner, scale)(x, s, cond={...}, uncond={...})`` calls ``inner(cat([x, x]), cat([s, s]), **batched)``
    where each conditioning entry is ``cat([uncond[k], cond[k]])``; keys missing from ``uncond`` are shared
    (x4: ``concat`` / ``y``).  With ``scale == 1`` or ``uncond=None`` only the conditional half runs (as upstream).
    Wrap the raw network for LDM models (guidance on eps / v), the Karras denoiser for the x2 upscaler.
    ``scale`` may be changed between calls (attribute).
    """

    def __init__(self, inner: Callable, scale: float):
        self.inner = inner
        self.scale = scale

    def __call__(self, x: Tensor, s, cond: dict | None = None, uncond: dict | None = None) -> Tensor:
        cond = cond or {}
        if uncond is None or self.scale == 1.0:
            return self.inner(x, s, **cond)
        s = _per_sample(s, x)
        out = self.inner(torch.cat([x, x]), torch.cat([s, s]), **_batch_cat(uncond, cond))
        u, c = out.chunk(2)
        return u + self.scale * (c - u)

    def __getattr__(self, name):  # expose the wrapped model's attributes (sigmas, sigma_to_t, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


# ------------------------------------------------------------------------------------------------
# discrete-time view (DDIM / PLMS / DDPM)


class DiscreteDenoiser:
    """``(eps, x0) = D(x, t, **cond)`` at integer schedule indices ``t`` (the LDM / diffusers discrete schedule).

    ``betas`` define the schedule (upstream buffers via ``ldm_buffers``); ``prediction`` is ``"eps"`` or ``"v"``.
    The network receives ``timestep_map[t]`` when a map is given (respaced chains feed the ORIGINAL timesteps
    to the network; StableSR's DDIM quirk maps alpha-table indices to other network timesteps).
    x0 / eps use the buffers at the table index ``t``:
    eps-param x0 = sqrt(1/a) x - sqrt(1/a - 1) eps;
    v-param x0 = sqrt(a) x - sqrt(1-a) v, eps = sqrt(a) v + sqrt(1-a) x.
    """

    def __init__(self, model: Callable, betas: Tensor, prediction: str = "eps", timestep_map: Tensor | None = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.model = model
        self.betas = betas
        self.prediction = prediction
        self.buffers = ldm_buffers(betas)
        self.alphas_cumprod = self.buffers["alphas_cumprod"]
        self.timestep_map = None if timestep_map is None else torch.as_tensor(timestep_map, dtype=torch.long)
        self._dev: dict = {}

    @classmethod
    def from_schedule(cls, model: Callable, schedule: dict, prediction: str = "eps") -> "DiscreteDenoiser":
        """From ``sdup.load(...).schedule`` (LDM "linear" betas)."""
        return cls(model, schedule_betas(schedule), prediction)

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def respaced(self, use_timesteps) -> "DiscreteDenoiser":
        """guided-diffusion / StableSR respacing: a chain over the kept timesteps (betas ``1 - ac[t_k]/ac[t_{k-1}]``
        from the float32 table, like StableSR); index k of the new chain feeds network timestep ``t_k``."""
        ts = torch.as_tensor(sorted(set(int(t) for t in use_timesteps)), dtype=torch.long)
        net_ts = ts if self.timestep_map is None else self.timestep_map[ts]
        return DiscreteDenoiser(self.model, respaced_betas(self.alphas_cumprod, ts), self.prediction, net_ts)

    def with_timestep_map(self, timestep_map: Tensor | None) -> "DiscreteDenoiser":
        out = DiscreteDenoiser.__new__(DiscreteDenoiser)
        out.__dict__.update(self.__dict__, _dev={})
        out.timestep_map = None if timestep_map is None else torch.as_tensor(timestep_map, dtype=torch.long)
        return out

    def buffer(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """``buffers[name][t]`` shaped for broadcasting against x."""
        key = (name, x.device)
        if key not in self._dev:
            self._dev[key] = self.buffers[name].to(x.device)
        return append_dims(self._dev[key][t], x.ndim).to(x.dtype)

    def network_timesteps(self, t: Tensor) -> Tensor:
        return t if self.timestep_map is None else self.timestep_map.to(t.device)[t]

    def __call__(self, x: Tensor, t, **cond) -> tuple[Tensor, Tensor]:
        t = _per_sample(t, x).long()
        out = self.model(x, self.network_timesteps(t), **cond)
        return self.split(x, t, out)

    def split(self, x: Tensor, t: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
        """Raw network output -> (eps, x0)."""
        if self.prediction == "v":
            a, s = self.buffer("sqrt_alphas_cumprod", t, x), self.buffer("sqrt_one_minus_alphas_cumprod", t, x)
            return a * out + s * x, a * x - s * out
        r, rm1 = self.buffer("sqrt_recip_alphas_cumprod", t, x), self.buffer("sqrt_recipm1_alphas_cumprod", t, x)
        return out, r * x - rm1 * out


# ------------------------------------------------------------------------------------------------
# k-diffusion view: D(x, sigma)


class CompVisDenoiser:
    """k-diffusion ``CompVisDenoiser`` / ``CompVisVDenoiser``: ``D(x, sigma, **cond)`` for a discrete-time model.

    Network input ``c_in x`` with ``c_in = 1 / sqrt(sigma^2 + 1)``, timestep ``t(sigma)`` (fractional) by linear
    interpolation of log-sigma over the training sigmas (``interpolation="log"``, k-diffusion) or of sigma
    (``"linear"``, the exact inverse of diffusers' ``np.interp`` grids; identical at integer timesteps).
    eps: ``D = x - sigma eps``;  v: ``D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v``.
    """

    def __init__(self, model: Callable, alphas_cumprod: Tensor, prediction: str = "eps", interpolation: str = "log"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if interpolation not in ("log", "linear"):
            raise ValueError("interpolation must be 'log' or 'linear'")
        self.model = model
        self.prediction = prediction
        self.interpolation = interpolation
        self.sigmas = sigmas_from_alphas_cumprod(alphas_cumprod.float())
        self.log_sigmas = self.sigmas.log()
        self._dev: dict = {}

    @classmethod
    def from_schedule(cls, model: Callable, schedule: dict, prediction: str = "eps", **kw) -> "CompVisDenoiser":
        return cls(model, ldm_buffers(schedule_betas(schedule))["alphas_cumprod"], prediction, **kw)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def _table(self, device) -> Tensor:
        if device not in self._dev:
            self._dev[device] = (self.log_sigmas if self.interpolation == "log" else self.sigmas).to(device)
        return self._dev[device]

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional timestep of each sigma (k-diffusion ``DiscreteSchedule.sigma_to_t``, not quantized)."""
        table = self._table(sigma.device)
        s = sigma.float().log() if self.interpolation == "log" else sigma.float()
        dists = s - table[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=table.shape[0] - 2)
        lo, hi = table[low], table[low + 1]
        w = ((lo - s) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = t.float()
        lo, hi, w = t.floor().long(), t.ceil().long(), t.frac()
        table = self.log_sigmas.to(t.device)
        return ((1 - w) * table[lo] + w * table[hi]).exp()

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = _per_sample(sigma, x).float()
        s = append_dims(sigma, x.ndim)
        c_in = (s ** 2 + 1) ** -0.5
        out = self.model(x * c_in.to(x.dtype), self.sigma_to_t(sigma), **cond)
        if self.prediction == "eps":
            return x - (s * out).to(x.dtype)
        return (x * c_in ** 2 - s * c_in * out).to(x.dtype)


class KarrasDenoiser:
    """k-diffusion ``Denoiser`` (Karras preconditioning), used by the x2 latent upscaler:

    ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise(sigma), **cond)`` with ``c_skip = sd^2 / (sigma^2 + sd^2)``,
    ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``, ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = log(sigma) / 4``.
    ``model`` is the network callable (for x2: concatenates the upsampled low-res latent and drops the 5th output
    channel).  ``sigma_min`` / ``sigma_max`` (x2: the SD training range) are informational.
    """

    def __init__(self, model: Callable, sigma_data: float = 1.0, c_noise: Callable[[Tensor], Tensor] | None = None,
                 sigma_min: float = 0.0291675, sigma_max: float = 14.614642):
        self.model = model
        self.sigma_data = sigma_data
        self.c_noise = c_noise or (lambda sigma: sigma.log() * 0.25)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2) ** 0.5
        c_in = 1 / (sigma ** 2 + sd2) ** 0.5
        return c_skip, c_out, c_in

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = _per_sample(sigma, x).float()
        c_skip, c_out, c_in = (append_dims(c, x.ndim).to(x.dtype) for c in self.scalings(sigma))
        return c_skip * x + c_out * self.model(x * c_in, self.c_noise(sigma), **cond)
