"""Gradients flow from a pipeline's output back to its input: ``prepare`` / ``sample`` / ``finish`` leave autograd
alone and the input checks do not detach (x4: the low-res image, checked against finite differences; x2: the
latents; StableSR: the image)."""
import pytest
import torch

import sdup
from helpers import FIXTURES
from sdup.pipelines.job import finish, sample
from sdup.pipelines.stablesr import prepare_stablesr
from sdup.pipelines.x2_latent import prepare_x2
from sdup.pipelines.x4 import prepare_x4

pytestmark = [pytest.mark.usefixtures("one_thread")]


def load(name):
    folder = FIXTURES / name
    return sdup.load(folder / "model.ckpt", config=folder / "config.yaml")


def x4_loss(model, image, weight):
    job = prepare_x4(model, image, [254, 7, 255], steps=2, guidance=3.0, seed=3, noise_level=30, progress=False)
    return (finish(job, sample(job)).images * weight).sum()


def test_x4_image_gradient_matches_finite_differences():
    model = load("x4")
    g = torch.Generator().manual_seed(0)
    image = (0.25 + 0.5 * torch.rand(1, 3, 8, 12, generator=g, dtype=torch.float64)).float()
    weight = torch.randn(1, 3, 32, 48, generator=g)
    direction = torch.randn(image.shape, generator=g)
    with torch.enable_grad():
        x = image.clone().requires_grad_(True)
        x4_loss(model, x, weight).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    eps = 1e-3  # central differences converge here (larger steps cross the output clamp at a few pixels)
    with torch.no_grad():
        fd = (x4_loss(model, image + eps * direction, weight) - x4_loss(model, image - eps * direction, weight)) / (2 * eps)
    analytic = (x.grad * direction).sum()
    assert abs(float(fd - analytic)) <= 0.01 * abs(float(analytic)), (float(fd), float(analytic))


def test_x2_latents_and_stablesr_image_gradients():
    g = torch.Generator().manual_seed(1)
    x2 = sdup.load(FIXTURES / "latent_upscaler" / "diffusers")
    with torch.enable_grad():
        low = torch.randn(1, 4, 8, 12, generator=g).requires_grad_(True)
        job = prepare_x2(x2, low, steps=2, guidance=2.0, decode=False, progress=False)
        finish(job, sample(job)).latents.square().mean().backward()
        assert low.grad is not None and torch.isfinite(low.grad).all() and low.grad.abs().sum() > 0
        model = load("stablesr")
        image = torch.rand(1, 3, 12, 20, generator=g).requires_grad_(True)
        job = prepare_stablesr(model, None, image, steps=2, input_size=32, progress=False)
        finish(job, sample(job)).images.mean().backward()
        assert image.grad is not None and torch.isfinite(image.grad).all() and image.grad.abs().sum() > 0
