"""Samplers as free functions with ONE shared signature (k-diffusion style), and the one table of them (``SAMPLERS``):

    x_0 = sample_<name>(model, x, steps, *, extra_args=None, callback=None, noise=None, generator=None,
                        disable=None, state=None, **options)

* ``model``: the wrapper the sampler family needs (see ``denoisers``):
  - discrete samplers (``sample_ddim``, ``sample_plms``, ``sample_ddpm``): a ``DiscreteDenoiser``,
    ``model(x, t, **extra_args) -> (eps, x0)`` at integer schedule indices, with ``.alphas_cumprod``/``.buffers``;
  - sigma samplers (``sample_euler``, ``sample_euler_ancestral``, ``sample_lms``, ``sample_dpmpp_2m``): a
    k-diffusion denoiser ``D(x, sigma, **extra_args) -> x0`` (``CompVisDenoiser``, ``KarrasDenoiser``, ``CFG(...)``).
* ``x``: the start state, always supplied by the caller.  Discrete samplers: ``x_T`` (unit variance, LDM
  convention).  Sigma samplers: ``x_T * sigmas[0]`` (k-diffusion convention; diffusers' Euler/LMS
  ``init_noise_sigma`` is ``sigmas[0]`` for linspace spacing, ``sqrt(sigmas[0]^2 + 1)`` for leading; a diffusers
  DPM-Solver start ``x_T`` corresponds to ``x_T * sqrt(sigmas[0]^2 + 1)`` here).
* ``steps``: discrete samplers: the schedule indices in visiting order (descending), e.g.
  ``ddim_timesteps(50).flip(0)``; sigma samplers: the sigma grid in visiting order including the final sigma
  (usually 0), e.g. ``discrete_sigmas(ac, 25)[0]`` or ``karras_sigmas(...)``.
* ``extra_args``: dict of keyword arguments forwarded to ``model`` at every call (``dict(cond=..., uncond=...)``
  with ``CFG``).
* ``callback(dict(i=, t=, sigma=, x=, x0_pred=))`` after every step: ``x`` is the state AFTER step i (upstream's
  ``x_inter[i + 1]``), ``x0_pred`` the x0 predicted during step i, ``t`` the schedule timestep (discrete) or
  ``model.sigma_to_t(sigma)`` when the model has one (else None), ``sigma`` the step's sigma (float).
* Per-step noise, never from a hidden RNG: ``noise`` = a sequence (``noise[i]`` is used at step i) or a callable
  ``noise(i) -> Tensor``; otherwise drawn as ``randn(x.shape, generator)`` where ``generator`` is a
  ``torch.Generator`` or a list of them, one per sample (sample j drawn from ``generator[j]``: a sample does not
  depend on the batch it is in).  A step draws noise only when it adds noise (DDIM with eta > 0; DDPM and
  Euler-ancestral at every step but the last; diffusers draws in the same order).
* ``disable``: disables the tqdm progress bar.
* ``state``: a ``SamplerState`` to resume from and keep current (resumable runs, ``sdup.pipelines.resume``): with
  ``state.x`` set, the run starts at step ``state.i`` from ``state.x`` and ``state.history`` (the argument ``x`` then
  only names the device); after every step, before ``callback``, the sampler stores the step count, the new ``x`` and
  what it keeps of earlier steps there.  A run resumed from the state saved after step k computes exactly what the
  uninterrupted run computes from step k on (the noise: restore the generators' states saved with it).
* Autograd: the samplers do not switch gradients off, so guidance / inversion research can backpropagate through a
  run; callers that only sample (the pipeline entry points, the CLIs) wrap them in ``torch.inference_mode()``.

Why two model contracts: DDIM / PLMS / DDPM are written on the discrete chain (alpha-bar tables at integer t, DDPM's
posterior coefficients) and need eps and x0 at once; the k-diffusion samplers integrate an ODE / SDE in sigma and
need only the denoised D(x, sigma).  ``DiscreteDenoiser`` and ``CompVisDenoiser`` give both views of one network.

The registry: ``SAMPLERS[name]`` is a ``Sampler`` (the function and what it accepts); ``get_sampler(name)`` also
takes the usual aliases (pndm, euler_ancestral, k_lms, dpm++_2m, ...).  A new sampler = a ``sample_<name>``
function here plus one row in ``SAMPLERS``; every pipeline, ``sdup.pipelines.job.sample`` and the CLIs pick it up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import trange

from .denoisers import append_dims

Tensor = torch.Tensor
Generators = torch.Generator | Sequence[torch.Generator] | None


# ------------------------------------------------------------------------------------------------
# noise


def randn(shape: Sequence[int], generator: Generators = None, *, dtype=torch.float32, device="cpu") -> Tensor:
    """Standard normal noise; with a list of generators sample j is drawn from ``generator[j]`` (same values as a
    batch-1 draw from that generator, like diffusers' ``randn_tensor``)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, dtype=dtype, device=device) for g in generator])
    gen_device = generator.device if generator is not None else torch.device(device)
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=gen_device).to(device)


def _noise_source(noise, generator: Generators, x: Tensor) -> Callable[[int], Tensor]:
    if noise is None:
        return lambda i: randn(x.shape, generator, dtype=x.dtype, device=x.device)
    if callable(noise):
        return lambda i: noise(i).to(x)
    return lambda i: noise[i].to(x)


# ------------------------------------------------------------------------------------------------
# where a run stands (resumable runs)


@dataclass
class SamplerState:
    """Where a sampler run stands: ``i`` steps done, ``x`` the state after them, ``history`` what a multistep
    sampler keeps of earlier steps (PLMS: the last 3 eps; K-LMS: the last ``order`` derivatives; DPM++ 2M: the
    previous denoised; the others: nothing).  Fresh (``x`` None): the run starts at step 0 from its ``x``."""
    i: int = 0
    x: Tensor | None = None
    history: list[Tensor] = field(default_factory=list)

    def update(self, i: int, x: Tensor, history: list[Tensor]) -> None:
        """Step ``i`` is done: ``x`` is the state after it."""
        self.i, self.x, self.history = i + 1, x, list(history)


def _begin(state: SamplerState | None, x: Tensor, n: int, disable, desc: str):
    """(state, x, the progress-bar range of the steps left): a fresh state starts at step 0 from ``x``."""
    state = state if state is not None else SamplerState()
    if state.x is None:
        state.update(-1, x, [])
    if not 0 <= state.i <= n:
        raise ValueError(f"the sampler state is at step {state.i}, the run has {n} steps")
    return state, state.x.to(x.device), trange(state.i, n, initial=state.i, total=n, disable=disable, desc=desc)


def _report(callback, i, t, sigma, x, x0):
    if callback is not None:
        callback(dict(i=i, t=t, sigma=float(sigma), x=x, x0_pred=x0))


def _t_of(model, sigma: Tensor):
    fn = getattr(model, "sigma_to_t", None)
    return float(fn(sigma.reshape(1))) if fn is not None and sigma > 0 else None


# ------------------------------------------------------------------------------------------------
# discrete samplers (LDM / diffusers DDIM, PLMS, DDPM)


def _timesteps(steps) -> list[int]:
    return [int(t) for t in torch.as_tensor(steps).reshape(-1).tolist()]


def _ddim_update(x0: Tensor, eps: Tensor, a_prev: float, sigma: float, z: Tensor | None) -> Tensor:
    """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z."""
    x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev - sigma ** 2) * eps
    return x if z is None else x + sigma * z


def _ddim_tables(model, ts: list[int], eta: float, final_alpha_cumprod: float | None):
    ac = model.alphas_cumprod.double()
    final = float(ac[0]) if final_alpha_cumprod is None else float(final_alpha_cumprod)
    a = [float(ac[t]) for t in ts]
    a_prev = a[1:] + [final]
    sig = [eta * math.sqrt((1 - ap) / (1 - at) * (1 - at / ap)) for at, ap in zip(a, a_prev)]
    return a, a_prev, sig


def sample_ddim(model, x: Tensor, timesteps, *, eta: float = 0.0, final_alpha_cumprod: float | None = None,
                extra_args=None, callback=None, noise=None, generator: Generators = None, disable=None,
                state: SamplerState | None = None) -> Tensor:
    """DDIM (CompVis/SAI ``DDIMSampler``; diffusers ``DDIMScheduler(steps_offset=1, set_alpha_to_one=False)``).

    alpha = ac[t_i], alpha_prev = ac[t_{i+1}] and ``final_alpha_cumprod`` (default ac[0]) for the last step;
    sigma = eta sqrt((1-a_prev)/(1-a) (1 - a/a_prev)); no clipping.  Works for eps and v models (via the
    DiscreteDenoiser's eps/x0).  Upstream timesteps: ``ddim_timesteps(S).flip(0)``.
    """
    extra_args, ts = extra_args or {}, _timesteps(timesteps)
    a, a_prev, sig = _ddim_tables(model, ts, eta, final_alpha_cumprod)
    draw = _noise_source(noise, generator, x)
    state, x, steps = _begin(state, x, len(ts), disable, "DDIM")
    for i in steps:
        eps, x0 = model(x, ts[i], **extra_args)
        x = _ddim_update(x0, eps, a_prev[i], sig[i], draw(i) if sig[i] > 0 else None)
        state.update(i, x, [])
        _report(callback, i, ts[i], math.sqrt((1 - a[i]) / a[i]), x, x0)
    return x


def sample_plms(model, x: Tensor, timesteps, *, final_alpha_cumprod: float | None = None,
                extra_args=None, callback=None, noise=None, generator: Generators = None, disable=None,
                state: SamplerState | None = None) -> Tensor:
    """PLMS (CompVis ``PLMSSampler``; diffusers ``PNDMScheduler(skip_prk_steps=True)`` for eps models).

    First step: pseudo improved Euler e' = (e(x, t) + e(x', t_next)) / 2 with x' the DDIM step from e(x, t)
    (t_next of a 1-step run is t itself); then Adams-Bashforth 2/3/4 over the raw eps history; x0 and the update
    use the DDIM (eta 0) formula with e'.  v models are run on their eps (upstream PLMS does not support v;
    diffusers' PNDM combines the raw v outputs instead).  Deterministic: ``noise``/``generator`` are unused.
    """
    extra_args, ts = extra_args or {}, _timesteps(timesteps)
    a, a_prev, _ = _ddim_tables(model, ts, 0.0, final_alpha_cumprod)
    state, x, steps = _begin(state, x, len(ts), disable, "PLMS")
    old = state.history  # the raw eps of the last (up to) 3 steps
    for i in steps:
        sq, sq1m = math.sqrt(a[i]), math.sqrt(1 - a[i])
        e, _ = model(x, ts[i], **extra_args)
        if not old:
            x_next = _ddim_update((x - sq1m * e) / sq, e, a_prev[i], 0.0, None)
            e_next, _ = model(x_next, ts[min(i + 1, len(ts) - 1)], **extra_args)
            e_prime = (e + e_next) / 2
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x0 = (x - sq1m * e_prime) / sq
        x = _ddim_update(x0, e_prime, a_prev[i], 0.0, None)
        old = (old + [e])[-3:]
        state.update(i, x, old)
        _report(callback, i, ts[i], math.sqrt((1 - a[i]) / a[i]), x, x0)
    return x


def sample_ddpm(model, x: Tensor, timesteps=None, *, clip_denoised: bool = False,
                extra_args=None, callback=None, noise=None, generator: Generators = None, disable=None,
                state: SamplerState | None = None) -> Tensor:
    """Ancestral DDPM (LDM ``p_sample_loop``): x0 from the model, posterior mean
    ``coef1[t] x0 + coef2[t] x``, ``+ exp(0.5 * posterior_log_variance_clipped[t]) z`` except at t = 0.

    ``timesteps`` (default: every index of the model's chain, descending) must be consecutive (t, t-1, ...): the
    posterior is the model's one-step posterior.  Respaced sampling (StableSR, diffusers ``DDPMScheduler`` with
    fewer steps) = ``sample_ddpm(model.respaced(use_timesteps), x)``: the network then gets the original
    timesteps through the denoiser's ``timestep_map``.  ``noise[i]`` is used at step i (upstream's i-th
    ``noise_like`` call; the last step's noise is drawn upstream but unused).
    """
    extra_args = extra_args or {}
    ts = _timesteps(timesteps) if timesteps is not None else list(range(model.num_timesteps - 1, -1, -1))
    if any(b != a - 1 for a, b in zip(ts, ts[1:])):
        raise ValueError("sample_ddpm needs consecutive timesteps; respace the model: model.respaced(timesteps)")
    draw = _noise_source(noise, generator, x)
    ac = model.alphas_cumprod
    state, x, steps = _begin(state, x, len(ts), disable, "DDPM")
    for i in steps:
        t = ts[i]
        _, x0 = model(x, t, **extra_args)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        mean = model.buffer("posterior_mean_coef1", tt, x) * x0 + model.buffer("posterior_mean_coef2", tt, x) * x
        if t > 0:
            x = mean + (0.5 * model.buffer("posterior_log_variance_clipped", tt, x)).exp() * draw(i)
        else:
            x = mean
        state.update(i, x, [])
        _report(callback, i, t, math.sqrt((1 - float(ac[t])) / float(ac[t])), x, x0)
    return x


# ------------------------------------------------------------------------------------------------
# sigma samplers (k-diffusion; diffusers Euler / Euler-ancestral / LMS / DPM-Solver++)


def _sigmas(sigmas, x: Tensor) -> Tensor:
    return torch.as_tensor(sigmas, dtype=torch.float32).to(x.device)


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """Karras ODE derivative dx/dsigma = (x - D) / sigma."""
    return (x - denoised) / append_dims(sigma, x.ndim).to(x.dtype)


def _denoise(model, x, sigma, extra_args):
    return model(x, sigma * x.new_ones([x.shape[0]], dtype=torch.float32), **extra_args)


def sample_euler(model, x: Tensor, sigmas, *, extra_args=None, callback=None, noise=None,
                 generator: Generators = None, disable=None, state: SamplerState | None = None) -> Tensor:
    """Euler (Karras et al. Alg. 2 without churn): x += (x - D(x, s_i)) / s_i * (s_{i+1} - s_i)."""
    extra_args, sigmas = extra_args or {}, _sigmas(sigmas, x)
    state, x, steps = _begin(state, x, len(sigmas) - 1, disable, "Euler")
    for i in steps:
        denoised = _denoise(model, x, sigmas[i], extra_args)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        state.update(i, x, [])
        _report(callback, i, _t_of(model, sigmas[i]), sigmas[i], x, denoised)
    return x


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step (k-diffusion ``get_ancestral_step``)."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - up ** 2) ** 0.5, up


def sample_euler_ancestral(model, x: Tensor, sigmas, *, eta: float = 1.0, s_noise: float = 1.0, extra_args=None,
                           callback=None, noise=None, generator: Generators = None, disable=None,
                           state: SamplerState | None = None) -> Tensor:
    """Euler ancestral (k-diffusion; diffusers ``EulerAncestralDiscreteScheduler``): Euler to sigma_down, then
    ``+ s_noise * sigma_up * z`` (no noise on the step to sigma = 0)."""
    extra_args, sigmas = extra_args or {}, _sigmas(sigmas, x)
    draw = _noise_source(noise, generator, x)
    state, x, steps = _begin(state, x, len(sigmas) - 1, disable, "Euler a")
    for i in steps:
        denoised = _denoise(model, x, sigmas[i], extra_args)
        down, up = ancestral_step(float(sigmas[i]), float(sigmas[i + 1]), eta)
        x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        if sigmas[i + 1] > 0 and up > 0:
            x = x + draw(i) * (s_noise * up)
        state.update(i, x, [])
        _report(callback, i, _t_of(model, sigmas[i]), sigmas[i], x, denoised)
    return x


def _gauss_legendre_4():
    a, b = math.sqrt(3 / 7 - 2 / 7 * math.sqrt(6 / 5)), math.sqrt(3 / 7 + 2 / 7 * math.sqrt(6 / 5))
    wa, wb = (18 + math.sqrt(30)) / 36, (18 - math.sqrt(30)) / 36
    return [(-b, wb), (-a, wa), (a, wa), (b, wb)]


def lms_coefficient(order: int, sigmas: Sequence[float], i: int, j: int) -> float:
    """k-diffusion ``linear_multistep_coeff``: integral over [s_i, s_{i+1}] of the Lagrange basis polynomial of
    node s_{i-j} on the nodes s_i .. s_{i-order+1}.  The integrand is a polynomial of degree < 4, so 4-point
    Gauss-Legendre quadrature is exact (upstream uses scipy's adaptive ``quad``)."""
    lo, hi = float(sigmas[i]), float(sigmas[i + 1])

    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return prod

    half, mid = (hi - lo) / 2, (hi + lo) / 2
    return half * sum(w * basis(mid + half * node) for node, w in _gauss_legendre_4())


def sample_lms(model, x: Tensor, sigmas, *, order: int = 4, extra_args=None, callback=None, noise=None,
               generator: Generators = None, disable=None, state: SamplerState | None = None) -> Tensor:
    """K-LMS (k-diffusion ``sample_lms``; diffusers ``LMSDiscreteScheduler``): linear multistep on d = (x - D)/s
    with up to ``order`` past derivatives.  Deterministic."""
    extra_args, sigmas = extra_args or {}, _sigmas(sigmas, x)
    s = [float(v) for v in sigmas.double().cpu()]
    state, x, steps = _begin(state, x, len(sigmas) - 1, disable, "LMS")
    ds = state.history  # the derivatives of the last (up to) ``order`` steps
    for i in steps:
        denoised = _denoise(model, x, sigmas[i], extra_args)
        ds = (ds + [to_d(x, sigmas[i], denoised)])[-order:]
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(cur, s, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        state.update(i, x, ds)
        _report(callback, i, _t_of(model, sigmas[i]), sigmas[i], x, denoised)
    return x


def sample_dpmpp_2m(model, x: Tensor, sigmas, *, extra_args=None, callback=None, noise=None,
                    generator: Generators = None, disable=None, state: SamplerState | None = None) -> Tensor:
    """DPM-Solver++(2M) (k-diffusion ``sample_dpmpp_2m``; diffusers ``DPMSolverMultistepScheduler`` defaults:
    dpmsolver++, order 2, midpoint, first-order first step and first-order step to sigma = 0).  Deterministic."""
    extra_args, sigmas = extra_args or {}, _sigmas(sigmas, x)
    lam = lambda s: -math.log(s)  # noqa: E731  (lambda = log(alpha / sigma_vp) = -log(sigma))
    state, x, steps = _begin(state, x, len(sigmas) - 1, disable, "DPM++ 2M")
    old = state.history[-1] if state.history else None  # the previous step's denoised
    for i in steps:
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = _denoise(model, x, sigmas[i], extra_args)
        if s_next == 0:
            x = denoised
        else:
            h = lam(s_next) - lam(s)
            d = denoised
            if old is not None:
                r = (lam(s) - lam(float(sigmas[i - 1]))) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
            x = (s_next / s) * x - math.expm1(-h) * d
        old = denoised
        state.update(i, x, [old])
        _report(callback, i, _t_of(model, sigmas[i]), sigmas[i], x, denoised)
    return x


# ------------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class Sampler:
    """One row of ``SAMPLERS``: a sampler function and its capabilities."""
    name: str             # canonical name
    fn: Callable          # sample_<name>
    discrete: bool        # True: (eps, x0) = model(x, t) on integer timesteps; False: D(x, sigma) on a sigma grid
    uses_eta: bool        # accepts eta (ddim: 0 = deterministic; euler_a: ancestral noise scale)
    default_eta: float = 0.0
    label: str = ""       # what the references call it

    def resolve_eta(self, eta: float | None) -> float:
        """eta for this sampler (None -> its default); a nonzero eta for a sampler without one is a ValueError."""
        if eta is None:
            return self.default_eta
        if not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be a number >= 0, got {eta!r}")
        if eta and not self.uses_eta:
            raise ValueError(f"eta applies to ddim and euler_a only; {self.name} is "
                             + ("deterministic" if self.name != "ddpm" else "always fully stochastic"))
        return float(eta)

    def options(self, eta: float) -> dict:
        """The keyword options this sampler takes beyond the shared signature."""
        return {"eta": eta} if self.uses_eta else {}


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddim", sample_ddim, True, True, 0.0, "DDIM (CompVis DDIMSampler / diffusers DDIMScheduler)"),
    Sampler("plms", sample_plms, True, False, 0.0, "PLMS (CompVis PLMSSampler / diffusers PNDMScheduler)"),
    Sampler("ddpm", sample_ddpm, True, False, 0.0, "ancestral DDPM on the respaced chain"),
    Sampler("euler", sample_euler, False, False, 0.0, "Euler (k-diffusion / EulerDiscreteScheduler)"),
    Sampler("euler_a", sample_euler_ancestral, False, True, 1.0,
            "Euler ancestral (k-diffusion / EulerAncestralDiscreteScheduler)"),
    Sampler("lms", sample_lms, False, False, 0.0, "K-LMS (k-diffusion / LMSDiscreteScheduler)"),
    Sampler("dpmpp_2m", sample_dpmpp_2m, False, False, 0.0, "DPM-Solver++(2M) (k-diffusion / DPMSolverMultistepScheduler)"),
)}
SAMPLER_NAMES = tuple(SAMPLERS)
DISCRETE_SAMPLERS = tuple(n for n, s in SAMPLERS.items() if s.discrete)
SIGMA_SAMPLERS = tuple(n for n, s in SAMPLERS.items() if not s.discrete)
ALIASES = {"pndm": "plms", "k_euler": "euler", "euler_ancestral": "euler_a", "k_euler_a": "euler_a", "k_lms": "lms",
           "dpm++_2m": "dpmpp_2m", "dpm++2m": "dpmpp_2m", "dpmsolver++": "dpmpp_2m"}


def get_sampler(name: str) -> Sampler:
    """Sampler name (case-insensitive; ``-`` and spaces read as ``_``; the aliases of ``ALIASES``) -> ``Sampler``."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    key = ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r} (choose from {', '.join(SAMPLER_NAMES)})")
    return SAMPLERS[key]
