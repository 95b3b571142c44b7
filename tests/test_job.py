"""The pipeline skeleton (sdup.pipelines.job) and the sampler registry: gradients flow through a sampler run, a Job
can be built by hand and sampled, the one guidance rule."""
import pytest
import torch

from sdup.diffusion import samplers as S
from sdup.diffusion.denoisers import CFG, CompVisDenoiser, DiscreteDenoiser
from sdup.diffusion.schedules import ldm_linear_betas
from sdup.pipelines.job import Job, finish, guided, sample


class TinyNet(torch.nn.Module):
    """eps(x, t) = conv(x) * (1 + t / 1000): a few parameters, differentiable in x and in its weights."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, t, context=None):
        return self.conv(x) * (1 + t.float().reshape(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "euler_a", "dpmpp_2m"])
def test_gradient_through_sampler(name):
    """No sampler switches autograd off: d(loss)/d(x_T) and d(loss)/d(weights) exist and are finite."""
    with torch.enable_grad():  # other test modules switch gradients off globally
        _gradient_run(name)


def _gradient_run(name):
    torch.manual_seed(0)
    net = TinyNet()
    betas = ldm_linear_betas(0.00085, 0.012, 1000)
    spec = S.get_sampler(name)
    x_T = torch.randn(1, 2, 8, 8, requires_grad=True)
    noise = [torch.randn(1, 2, 8, 8) for _ in range(3)]
    if spec.discrete:
        den = DiscreteDenoiser(net, betas)
        ts = torch.tensor([901, 501, 1]) if name != "ddpm" else None
        den = den.respaced([1, 501, 901]) if name == "ddpm" else den
        out = spec.fn(den, x_T, ts, noise=noise, disable=True)
    else:
        den = CompVisDenoiser(net, DiscreteDenoiser(net, betas).alphas_cumprod)
        out = spec.fn(den, x_T * 14.6, torch.tensor([14.6, 3.0, 0.5, 0.0]), noise=noise, disable=True)
    out.square().mean().backward()
    assert x_T.grad is not None and torch.isfinite(x_T.grad).all() and x_T.grad.abs().sum() > 0
    assert net.conv.weight.grad is not None and torch.isfinite(net.conv.weight.grad).all()


def test_job_by_hand_swap_and_hook():
    """A Job built by hand: sample() equals calling the sampler; swapping the sampler and adding a hook work."""
    torch.manual_seed(1)
    net = TinyNet().requires_grad_(False)
    den = DiscreteDenoiser(CFG(net, 1.0), ldm_linear_betas(0.00085, 0.012, 1000))
    x_T = torch.randn(2, 2, 8, 8)
    ts = torch.tensor([801, 401, 1])
    job = Job(sampler=S.get_sampler("ddim"), denoiser=den, x_T=x_T, grid=ts, extra_args=dict(cond={}, uncond=None),
              progress=False,
              decode=lambda z: z[:, :1].repeat(1, 3, 1, 1).tanh())
    ref = S.sample_ddim(den, x_T, ts, extra_args=dict(cond={}, uncond=None), disable=True)
    assert torch.equal(sample(job), ref)
    seen = []
    job.callback = lambda d: seen.append(d["i"])
    job.sampler, job.options = S.get_sampler("plms"), {}
    res = finish(job, sample(job))
    assert seen == [0, 1, 2] and res.parameters["sampler"] == "plms"
    assert res.images.shape == (2, 3, 8, 8) and 0 <= float(res.images.min()) and float(res.images.max()) <= 1


def test_registry_and_guidance_rule():
    assert S.get_sampler("DPM++ 2M").name == "dpmpp_2m" and S.get_sampler("k_euler_a").name == "euler_a"
    assert set(S.SAMPLER_NAMES) == set(S.DISCRETE_SAMPLERS) | set(S.SIGMA_SAMPLERS)
    with pytest.raises(ValueError, match="unknown sampler"):
        S.get_sampler("heun")
    with pytest.raises(ValueError, match="eta applies"):
        S.get_sampler("lms").resolve_eta(0.5)
    assert guided(0.5) and guided(0.0) and not guided(1.0) and guided(7.5)
    assert not guided(0.5, "diffusers") and guided(1.5, "diffusers")
