"""Schedules, denoisers and samplers (sdup.diffusion): parity with the upstream sampler fixtures (CompVis / SAI /
StableSR schedules, diffusers x2 sigmas) and with diffusers' schedulers driving the same tiny sdup UNet."""
import functools
import inspect
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sdup
from helpers import FIXTURES, SAMPLER_TOL, assert_parity, assert_within_ulps, ulp_distance
from sdup.diffusion import samplers as S
from sdup.diffusion.denoisers import CFG, CompVisDenoiser, DiffusionWrapper, DiscreteDenoiser, KarrasDenoiser
from sdup.diffusion.schedules import (ddim_parameters, ddim_timesteps, diffusers_alphas_cumprod, discrete_sigmas,
                                      init_noise_sigma, interp_sigmas, karras_sigmas, ldm_buffers, ldm_linear_betas,
                                      q_sample, respaced_betas, schedule_betas, space_timesteps)

pytestmark = [pytest.mark.usefixtures("no_grad"),  # forward-only tests (conftest.py)
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # numpy 2 notices inside diffusers
SCHEDULE_TOL = dict(rtol=1e-6, atol=1e-7)
GRID_ULPS = 1                  # one rounded library call (sqrt) apart between machines
LDM_VS_DIFFUSERS_RTOL = 2e-5   # two different alphas_cumprod tables (measured up to 9.1e-6: x4, 25-50 steps)
BETAS = {"sd1": (0.00085, 0.012), "x4": (0.0001, 0.02), "stablesr": (0.00085, 0.012)}


def fixture(family, name):
    return load_file(FIXTURES / family / f"{name}.safetensors")


def stacked(d, prefix):
    keys = sorted(k for k in d if k.startswith(prefix + "."))
    return [d[k] for k in keys]


@functools.lru_cache(maxsize=None)
def loaded(family):
    m = sdup.load(FIXTURES / family / "model.ckpt", config=FIXTURES / family / "config.yaml")
    m.unet.eval()
    return m


def discrete(family, scale=1.0):
    m = loaded(family)
    return DiscreteDenoiser(CFG(DiffusionWrapper(m.unet), scale), schedule_betas(m.schedule), m.prediction)


# ------------------------------------------------------------------------------------------------
# schedules


def assert_buffers(ours, ref, what):
    for k, v in ref.items():
        torch.testing.assert_close(ours[k], v, **SCHEDULE_TOL, msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.parametrize("family", ["sd1", "x4"])
def test_ldm_schedule_matches_registered_buffers(family):
    m = loaded(family)
    assert (m.schedule["linear_start"], m.schedule["linear_end"]) == BETAS[family]
    ref = fixture(family, "schedule")
    assert len(ref) == 12
    assert_buffers(ldm_buffers(schedule_betas(m.schedule)), ref, family)


def test_full_size_schedule_buffers():
    sd = ldm_buffers(ldm_linear_betas(0.00085, 0.012))
    assert_buffers(sd, load_file(FIXTURES / "schedule_buffers_sd-v1-4.safetensors"), "sd-v1-4")
    x4 = load_file(FIXTURES / "schedule_buffers_x4-upscaler-ema.safetensors")
    ours = ldm_buffers(ldm_linear_betas(0.0001, 0.02))
    assert_buffers(ours, {k: v for k, v in x4.items() if "." not in k}, "x4")
    low = {k.split(".", 1)[1]: v for k, v in x4.items() if k.startswith("low_scale_model.")}
    assert len(low) == 8
    assert_buffers(ours, low, "x4 low_scale_model")
    assert_buffers(sd, {k[3:]: v for k, v in x4.items() if k.startswith("v2.")}, "sd2 v2-inference")


def test_stablesr_schedule_is_float32_respaced():
    """StableSR models carry betas rebuilt from the float32 alphas_cumprod (a respacing over all 1000 steps) and
    buffers recomputed with float32 NumPy arithmetic: ac is unchanged, betas and posteriors differ by ~1e-5 rel."""
    ac32 = ldm_buffers(ldm_linear_betas(0.00085, 0.012))["alphas_cumprod"]
    ours = ldm_buffers(respaced_betas(ac32, range(1000)))
    assert_buffers(ours, fixture("stablesr", "schedule"), "stablesr tiny")
    assert_buffers(ours, load_file(FIXTURES / "schedule_buffers_stablesr_000117.safetensors"), "stablesr full")


def test_x4_noise_augmentation():
    d = fixture("x4", "noise_augmentation")
    s = loaded("x4").schedule
    buf = ldm_buffers(ldm_linear_betas(s["noise_linear_start"], s["noise_linear_end"]))
    torch.testing.assert_close(buf["sqrt_alphas_cumprod"], d["out.sqrt_alphas_cumprod"], **SCHEDULE_TOL)
    torch.testing.assert_close(buf["sqrt_one_minus_alphas_cumprod"], d["out.sqrt_one_minus_alphas_cumprod"],
                               **SCHEDULE_TOL)
    out = q_sample(d["in.x_low"], d["in.noise_level"], d["in.noise"], buf)
    assert_parity(out, d["out.x_aug"], what="x4 noise augmentation")


def test_ddim_timesteps_rules():
    assert ddim_timesteps(50)[:3].tolist() == [1, 21, 41]
    assert len(ddim_timesteps(75)) == 77  # upstream quirk: range(0, 1000, 13)
    with pytest.raises(ValueError, match="leading"):
        ddim_timesteps(3)
    assert ddim_timesteps(3, offset=0).tolist() == [0, 333, 666, 999]


def test_space_timesteps_and_respacing():
    assert space_timesteps(1000, [20])[:4] == [0, 53, 105, 158] and space_timesteps(1000, [20])[-1] == 999
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(300, [10, 15, 20])[:12] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99, 100, 107]
    assert space_timesteps(1000, "250") == space_timesteps(1000, [250])
    d = fixture("stablesr", "sampler_ddpm_respaced10")
    ts = space_timesteps(1000, [10])
    assert ts == d["out.ori_timesteps"].tolist()
    base = DiscreteDenoiser(None, ldm_linear_betas(0.00085, 0.012))
    r = base.respaced(ts)
    assert r.timestep_map.tolist() == ts
    torch.testing.assert_close(r.buffers["betas"], d["out.respaced_betas"], **SCHEDULE_TOL)
    torch.testing.assert_close(r.alphas_cumprod, d["out.respaced_alphas_cumprod"], **SCHEDULE_TOL)
    torch.testing.assert_close(r.buffers["posterior_log_variance_clipped"], d["out.posterior_log_variance_clipped"],
                               **SCHEDULE_TOL)


def test_latent_upscaler_sigmas():
    cfg = json.loads((FIXTURES / "latent_upscaler/diffusers/scheduler/scheduler_config.json").read_text())
    assert (cfg["beta_schedule"], cfg["timestep_spacing"], cfg["final_sigmas_type"]) == \
        ("scaled_linear", "linspace", "zero")
    ac = diffusers_alphas_cumprod(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"], cfg["beta_schedule"])
    ac_ldm = ldm_buffers(ldm_linear_betas(cfg["beta_start"], cfg["beta_end"]))["alphas_cumprod"]
    for name in ("pipeline_nocfg", "pipeline_cfg9"):
        d = fixture("latent_upscaler", name)
        sigmas, ts = discrete_sigmas(ac, 10, cfg["timestep_spacing"], cfg["steps_offset"])
        # the fixture was made on another CPU: torch's float32 sqrt (MKL) may round differently there
        assert_within_ulps(sigmas, d["out.sigmas"], GRID_ULPS, name)
        # the LDM float64 table gives the same grid to ~2e-6 relative
        torch.testing.assert_close(discrete_sigmas(ac_ldm, 10)[0], d["out.sigmas"], rtol=5e-6, atol=0)
        assert torch.equal(ts.float(), d["out.timesteps"])  # integers 999, 888, ..., 0: exact on any machine
        assert init_noise_sigma(sigmas, "linspace") == pytest.approx(float(d["out.init_noise_sigma"]), rel=1e-6)


@pytest.mark.parametrize("family", ["sd1", "x4"])
def test_ddim_schedule_tables(family):
    d = fixture(family, "sampler_ddim_eta0.5_cfg" if family == "sd1" else "sampler_ddim_cfg")
    eta = 0.5 if family == "sd1" else 0.0
    ts = ddim_timesteps(10)
    assert ts.tolist() == d["out.ddim_timesteps"].tolist() == list(range(1, 1000, 100))
    assert ddim_timesteps(10, offset=0).tolist() == list(range(0, 1000, 100))
    a, a_prev, sig = ddim_parameters(discrete(family).alphas_cumprod, ts.flip(0), eta)
    for ours, key in ((a, "alphas"), (a_prev, "alphas_prev"), (sig, "sigmas")):
        torch.testing.assert_close(ours.flip(0).float(), d[f"out.ddim_{key}"], **SCHEDULE_TOL)


# ------------------------------------------------------------------------------------------------
# upstream sampler fixtures through sdup samplers (tiny UNet, 10 steps, batch 2, 12x16)


def run_with_intermediates(fn, model, x, steps, **kw):
    xs, x0s = [], []
    out = fn(model, x, steps, callback=lambda s: (xs.append(s["x"]), x0s.append(s["x0_pred"])), disable=True, **kw)
    return out, xs, x0s


def check_fixture(d, out, xs, x0s, what):
    errs = {"samples": assert_parity(out, d["out.samples"], SAMPLER_TOL, f"{what} samples")}
    inter = stacked(d, "out.x_inter")
    assert len(inter) == 9
    for i, ref in enumerate(inter):
        errs[f"x_inter.{i + 1:02d}"] = assert_parity(xs[i], ref, SAMPLER_TOL, f"{what} x_inter.{i + 1:02d}")
    for i, ref in enumerate(stacked(d, "out.pred_x0")):
        errs[f"pred_x0.{i + 1:02d}"] = assert_parity(x0s[i], ref, SAMPLER_TOL, f"{what} pred_x0.{i + 1:02d}")
    return max(errs.values())


SD1_FIXTURES = [("sampler_ddim_nocfg", "ddim", 1.0, 0.0), ("sampler_ddim_cfg", "ddim", 7.5, 0.0),
                ("sampler_ddim_eta0.5_cfg", "ddim", 7.5, 0.5), ("sampler_plms_nocfg", "plms", 1.0, 0.0),
                ("sampler_plms_cfg", "plms", 7.5, 0.0)]


@pytest.mark.parametrize("name,sampler,scale,eta", SD1_FIXTURES)
def test_sd1_sampler_fixture(name, sampler, scale, eta):
    d = fixture("sd1", name)
    model = discrete("sd1", scale)
    extra = dict(cond=dict(context=d["in.cond"]), uncond=dict(context=d["in.uncond"]) if scale != 1 else None)
    kw = dict(extra_args=extra)
    if sampler == "ddim":
        kw.update(eta=eta, noise=stacked(d, "in.noise") or None)
    fn = S.sample_ddim if sampler == "ddim" else S.sample_plms
    out, xs, x0s = run_with_intermediates(fn, model, d["in.x_T"], ddim_timesteps(10).flip(0), **kw)
    check_fixture(d, out, xs, x0s, f"sd1 {name}")


@pytest.mark.parametrize("name,scale", [("sampler_ddim_nocfg", 1.0), ("sampler_ddim_cfg", 9.0)])
def test_x4_sampler_fixture(name, scale):
    d = fixture("x4", name)
    model = discrete("x4", scale)
    assert model.prediction == "v"
    cond = dict(context=d["in.cond.c_crossattn"], concat=d["in.cond.c_concat"], y=d["in.cond.c_adm"])
    uncond = dict(context=d["in.uncond.c_crossattn"]) if scale != 1 else None  # c_concat / c_adm shared
    out, xs, x0s = run_with_intermediates(S.sample_ddim, model, d["in.x_T"], ddim_timesteps(10).flip(0),
                                          extra_args=dict(cond=cond, uncond=uncond))
    check_fixture(d, out, xs, x0s, f"x4 {name}")


STABLESR_FIXTURES = [("sampler_ddpm_respaced10", 1.0), ("sampler_ddim_nocfg", 1.0), ("sampler_ddim_negprompt_cfg", 5.5)]


@pytest.mark.parametrize("name,scale", STABLESR_FIXTURES)
def test_stablesr_sampler_fixture(name, scale):
    """StableSR: respaced DDPM (network gets the original timesteps through ``timestep_map``) and the DDIM quirk
    (alphas of the offset-0 uniform grid, network timesteps ``space_timesteps``), time-aware encoder run at the
    network timestep on the shared low-res latent."""
    m = loaded("stablesr")
    if getattr(m, "struct_encoder", None) is None:
        pytest.skip("the StableSR loader does not provide the time-aware encoder")
    d = fixture("stablesr", name)

    def net(x, t, context=None, lr=None):
        return m.unet(x, t, context, features=m.struct_encoder(lr, t))

    cond = dict(context=d["in.cond"], lr=d["in.struct_cond_latent"])
    extra = dict(cond=cond, uncond=dict(context=d["in.uncond"]) if scale != 1 else None)
    model = DiscreteDenoiser(CFG(net, scale), schedule_betas(m.schedule), m.prediction)
    if name.startswith("sampler_ddpm"):
        model = model.respaced(space_timesteps(1000, [10]))
        assert model.timestep_map.tolist() == d["out.ori_timesteps"].tolist()
        out, xs, _ = run_with_intermediates(S.sample_ddpm, model, d["in.x_T"], None, extra_args=extra,
                                            noise=stacked(d, "in.noise"))
    else:
        alpha_ts = ddim_timesteps(10, offset=0)
        assert alpha_ts.tolist() == d["out.ddim_schedule_timesteps"].tolist()
        assert space_timesteps(1000, [10]) == d["out.model_timesteps"].tolist()
        tmap = torch.arange(1000)
        tmap[alpha_ts] = torch.tensor(space_timesteps(1000, [10]))
        out, xs, _ = run_with_intermediates(S.sample_ddim, model.with_timestep_map(tmap), d["in.x_T"],
                                            alpha_ts.flip(0), extra_args=extra)
    check_fixture(d, out, xs, [], f"stablesr {name}")


def test_latent_upscaler_pipeline_with_karras_denoiser():
    """x2: KarrasDenoiser + CFG on D + Euler over the diffusers sigma grid, driving diffusers' own K-UNet."""
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(FIXTURES / "latent_upscaler/diffusers/unet").eval()

    def net(x, c_noise, image_cond, context, pooled):
        t_cond = torch.cat([torch.ones(x.shape[0], 64), torch.zeros(x.shape[0], 64), pooled], dim=1)
        return unet(torch.cat([x, image_cond], 1), c_noise, encoder_hidden_states=context,
                    timestep_cond=t_cond).sample[:, :-1]

    for name, scale in (("pipeline_nocfg", 1.0), ("pipeline_cfg9", 9.0)):
        d = fixture("latent_upscaler", name)
        image_cond = torch.nn.functional.interpolate(d["in.image_latents"], scale_factor=2, mode="nearest")
        cond = dict(image_cond=image_cond, context=d["in.prompt_embeds"], pooled=d["in.pooled_prompt_embeds"])
        uncond = None
        if scale != 1:
            uncond = dict(context=d["in.negative_prompt_embeds"], pooled=d["in.negative_pooled_prompt_embeds"])
        sigmas = d["out.sigmas"]
        out, xs, _ = run_with_intermediates(S.sample_euler, CFG(KarrasDenoiser(net), scale),
                                            d["in.latents_unscaled"] * sigmas[0], sigmas,
                                            extra_args=dict(cond=cond, uncond=uncond))
        assert_parity(out, d["out.latents"], SAMPLER_TOL, f"x2 {name}")
        for i, ref in enumerate(stacked(d, "out.step_latents")):
            assert_parity(xs[i], ref, SAMPLER_TOL, f"x2 {name} step {i}")


# ------------------------------------------------------------------------------------------------
# diffusers schedulers driving the same tiny sdup UNet


def diffusers_scheduler(name, family, **kw):
    import diffusers
    start, end = BETAS[family]
    cfg = dict(beta_start=start, beta_end=end, beta_schedule="scaled_linear", num_train_timesteps=1000,
               prediction_type="epsilon" if family == "sd1" else "v_prediction")
    extra = {"DDIMScheduler": dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                                   timestep_spacing="leading"),
             "PNDMScheduler": dict(skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
             "DDPMScheduler": dict(clip_sample=False)}.get(name, {})
    if name == "LMSDiscreteScheduler":  # the top-level name is a dummy without scipy
        from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler as cls
    else:
        cls = getattr(diffusers, name)
    return cls(**{**cfg, **extra, **kw})


def unet_inputs(family, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, 4, 12, 16, generator=g)
    cond = dict(context=torch.randn(batch, 77, 32, generator=g))
    if family == "x4":
        cond.update(concat=torch.randn(batch, 3, 12, 16, generator=g), y=torch.tensor([20, 300])[:batch])
    return x_T, cond


def run_diffusers(sched, raw, x_T, cond, seed=123, steps=10, **step_kw):
    """The diffusers pipeline loop, done by hand (noise from a generator seeded ``seed``)."""
    sched.set_timesteps(steps)
    x = x_T * sched.init_noise_sigma
    if "generator" in inspect.signature(sched.step).parameters:
        step_kw["generator"] = torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        out = raw(sched.scale_model_input(x, t), t.reshape(1).expand(x.shape[0]), **cond)
        x = sched.step(out, t, x, **step_kw).prev_sample
    return x


def discrete_family(family):
    m = loaded(family)
    raw = DiffusionWrapper(m.unet)
    return raw, DiscreteDenoiser(raw, schedule_betas(m.schedule), m.prediction)


DISCRETE_CASES = [("DDIMScheduler", "sd1", {}), ("DDIMScheduler", "x4", {}), ("DDIMScheduler", "sd1", dict(eta=1.0)),
                  ("PNDMScheduler", "sd1", {}), ("DDPMScheduler", "sd1", {}), ("DDPMScheduler", "x4", {})]


@pytest.mark.parametrize("name,family,opts", DISCRETE_CASES)
def test_discrete_samplers_match_diffusers(name, family, opts):
    raw, model = discrete_family(family)
    x_T, cond = unet_inputs(family)
    sched = diffusers_scheduler(name, family)
    ref = run_diffusers(sched, raw, x_T, cond, **opts)
    g = torch.Generator().manual_seed(123)
    if name == "DDPMScheduler":
        ts = sched.timesteps.tolist()
        out = S.sample_ddpm(model.respaced(ts), x_T, extra_args=cond, generator=g, disable=True)
    else:
        fn = S.sample_ddim if name == "DDIMScheduler" else S.sample_plms
        kw = dict(eta=opts["eta"]) if "eta" in opts else {}
        out = fn(model, x_T, ddim_timesteps(10).flip(0), extra_args=cond, generator=g, disable=True, **kw)
    assert_parity(out, ref, SAMPLER_TOL, f"{name} {family} {opts}")


SIGMA_CASES = [("EulerDiscreteScheduler", S.sample_euler),
               ("EulerAncestralDiscreteScheduler", S.sample_euler_ancestral),
               ("LMSDiscreteScheduler", S.sample_lms), ("DPMSolverMultistepScheduler", S.sample_dpmpp_2m)]


@pytest.fixture
def scipy_free_lms(monkeypatch):
    """diffusers' LMS integrates its coefficients with scipy (not installed): stand in an independent
    composite Simpson rule (exact for the cubic integrands)."""
    import diffusers.schedulers.scheduling_lms_discrete as lms

    class Integrate:
        @staticmethod
        def quad(fn, a, b, epsrel=None):
            n, h = 64, (float(b) - float(a)) / 64
            vals = [float(fn(float(a) + k * h)) for k in range(n + 1)]
            return h / 3 * (vals[0] + vals[-1] + 4 * sum(vals[1:-1:2]) + 2 * sum(vals[2:-1:2])), 0.0

    monkeypatch.setattr(lms, "integrate", Integrate, raising=False)


@pytest.mark.parametrize("family", ["sd1", "x4"])
@pytest.mark.parametrize("name,fn", SIGMA_CASES)
def test_sigma_samplers_match_diffusers(name, fn, family, scipy_free_lms):
    m = loaded(family)
    raw = DiffusionWrapper(m.unet)
    ac = ldm_buffers(schedule_betas(m.schedule))["alphas_cumprod"]
    model = CompVisDenoiser(raw, ac, m.prediction)
    x_T, cond = unet_inputs(family)
    sched = diffusers_scheduler(name, family)
    ref = run_diffusers(sched, raw, x_T, cond)

    dpm = name == "DPMSolverMultistepScheduler"
    grid = dict(spacing=sched.config.timestep_spacing, steps_offset=sched.config.steps_offset, dpm_solver=dpm)
    # from diffusers' own float32 table: the same torch ops and numpy calls on the same machine
    same, ts = discrete_sigmas(sched.alphas_cumprod, 10, **grid)
    assert torch.equal(same, sched.sigmas.float()) and torch.equal(ts, sched.timesteps.double())
    # sdup samples on the LDM table (float64 products, rounded once), which is not diffusers' float32 cumprod:
    # near t = 100, sigma = sqrt((1 - ac) / ac) magnifies their ~1e-7 relative difference to ~2e-6
    sigmas = discrete_sigmas(ac, 10, **grid)[0]
    torch.testing.assert_close(sigmas, sched.sigmas, rtol=LDM_VS_DIFFUSERS_RTOL, atol=0)
    torch.testing.assert_close(model.sigma_to_t(sigmas[:-1]).double(), ts, rtol=0, atol=2e-3)
    start = x_T * (math.sqrt(sigmas[0] ** 2 + 1) if dpm else float(sched.init_noise_sigma))
    out = fn(model, start, sigmas, extra_args=cond, generator=torch.Generator().manual_seed(123), disable=True)
    assert_parity(out, ref, SAMPLER_TOL, f"{name} {family}")


@pytest.mark.parametrize("family", ["sd1", "x4"])
@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_sigma_grids_equal_diffusers_on_one_machine(name, family, spacing):
    """Fractional (7, 25 steps) and integer timesteps: sdup's grid from diffusers' table is diffusers' grid, bit for
    bit, because both run the same torch ops and numpy calls (torch.linspace or a different interpolation formula
    round differently in the last bit)."""
    for n in (7, 10, 25):
        sched = diffusers_scheduler(name, family, timestep_spacing=spacing, steps_offset=1)
        sched.set_timesteps(n)
        sigmas, ts = discrete_sigmas(sched.alphas_cumprod, n, spacing, 1, dpm_solver=name.startswith("DPM"))
        assert torch.equal(sigmas, sched.sigmas.float()), (n, ulp_distance(sigmas, sched.sigmas))
        assert torch.equal(ts, sched.timesteps.double()), n


def test_sigma_grid_within_one_ulp_of_correctly_rounded_sqrt():
    """What another CPU may compute: torch's CPU sqrt is MKL's vector sqrt, not correctly rounded, and MKL picks
    its code path from the CPU model. A grid from IEEE (correctly rounded) numpy sqrt stands in for such a CPU: on
    an AMD Zen 4, 4 of the 11 elements of the x2 fixture's grid then differ by one ulp, the symptom seen on a Xeon."""
    ac = diffusers_alphas_cumprod()
    ieee = torch.from_numpy(np.sqrt(((1 - ac) / ac).numpy()))
    for n in (10, 25):
        ours, ts = discrete_sigmas(ac, n)
        other = torch.cat([interp_sigmas(ieee, ts), torch.zeros(1, dtype=torch.float64)]).float()
        assert_within_ulps(ours, other, GRID_ULPS, f"{n} steps")


def test_karras_sigmas_match_diffusers():
    sched = diffusers_scheduler("EulerDiscreteScheduler", "sd1", use_karras_sigmas=True)
    sched.set_timesteps(12)
    ac = ldm_buffers(ldm_linear_betas(0.00085, 0.012))["alphas_cumprod"]
    model = CompVisDenoiser(None, ac)
    ours = karras_sigmas(12, model.sigma_min, model.sigma_max)
    torch.testing.assert_close(ours, sched.sigmas, rtol=2e-6, atol=0)
    torch.testing.assert_close(model.sigma_to_t(ours[:-1]), sched.timesteps, rtol=0, atol=2e-3)


# ------------------------------------------------------------------------------------------------
# API behaviour


def test_per_sample_generators_make_batches_reproducible():
    raw, model = discrete_family("sd1")
    ctx = torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(5))
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    ts = ddim_timesteps(4).flip(0)

    def run(seeds, context):
        x_T = S.randn((len(seeds), 4, 12, 16), gens(seeds))
        return S.sample_ddim(model, x_T, ts, eta=1.0, extra_args=dict(context=context), generator=gens(seeds),
                             disable=True)

    three = run([10, 11, 12], ctx)
    one = run([11], ctx[1:2])
    assert_parity(one[0], three[1], what="ddim batch 1 vs 3")  # batch-size dependent GEMM rounding only
    assert not torch.allclose(three[0], three[1])
    # and for a sigma sampler
    den = CompVisDenoiser(raw, model.alphas_cumprod)
    sigmas, _ = discrete_sigmas(model.alphas_cumprod, 4)
    a = S.sample_euler_ancestral(den, S.randn((3, 4, 12, 16), gens([1, 2, 3])) * sigmas[0], sigmas,
                                 extra_args=dict(context=ctx), generator=gens([1, 2, 3]), disable=True)
    b = S.sample_euler_ancestral(den, S.randn((1, 4, 12, 16), gens([3])) * sigmas[0], sigmas,
                                 extra_args=dict(context=ctx[2:]), generator=gens([3]), disable=True)
    assert_parity(b[0], a[2], what="euler a batch 1 vs 3")


def test_injected_noise_equals_generator_noise_and_callback():
    _, model = discrete_family("sd1")
    x_T, cond = unet_inputs("sd1")
    ts = ddim_timesteps(4).flip(0)
    g = torch.Generator().manual_seed(7)
    noises = [torch.randn(x_T.shape, generator=g) for _ in range(len(ts))]
    seen = []
    a = S.sample_ddim(model, x_T, ts, eta=0.7, extra_args=cond, noise=noises, callback=seen.append, disable=True)
    b = S.sample_ddim(model, x_T, ts, eta=0.7, extra_args=cond, generator=torch.Generator().manual_seed(7),
                      disable=True)
    c = S.sample_ddim(model, x_T, ts, eta=0.7, extra_args=cond, noise=lambda i: noises[i], disable=True)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert [s["i"] for s in seen] == [0, 1, 2, 3] and [s["t"] for s in seen] == ts.tolist()
    assert torch.equal(seen[-1]["x"], a) and seen[0]["sigma"] > seen[-1]["sigma"]
    assert set(seen[0]) == {"i", "t", "sigma", "x", "x0_pred"}


def test_ddpm_rejects_gaps_and_full_chain_runs():
    _, model = discrete_family("sd1")
    x_T, cond = unet_inputs("sd1")
    with pytest.raises(ValueError, match="respace"):
        S.sample_ddpm(model, x_T, [900, 800], extra_args=cond)
    short = model.respaced(range(0, 1000, 250))
    out = S.sample_ddpm(short, x_T, extra_args=cond, generator=torch.Generator().manual_seed(0), disable=True)
    assert torch.isfinite(out).all()


def test_cfg_batches_uncond_first_and_shares_missing_keys():
    calls = []

    def raw(x, t, context=None, concat=None):
        calls.append((x.shape[0], t.tolist(), context[:, 0, 0].tolist(), concat[:, 0, 0, 0].tolist()))
        return context[:, :1, :1].reshape(-1, 1, 1, 1).expand_as(x) + 0 * x

    x = torch.zeros(2, 4, 2, 2)
    cond = dict(context=torch.ones(2, 3, 3), concat=torch.full((2, 1, 2, 2), 5.0))
    out = CFG(raw, 3.0)(x, torch.tensor([7, 7]), cond=cond, uncond=dict(context=torch.zeros(2, 3, 3)))
    assert calls == [(4, [7, 7, 7, 7], [0, 0, 1, 1], [5, 5, 5, 5])]
    assert torch.equal(out, torch.full_like(x, 3.0))  # 0 + 3 * (1 - 0)
    one = CFG(raw, 1.0)(x, torch.tensor([7, 7]), cond=cond, uncond=dict(context=torch.zeros(2, 3, 3)))
    assert torch.equal(one, torch.ones_like(x)) and len(calls) == 2 and calls[1][0] == 2  # scale 1: cond only
