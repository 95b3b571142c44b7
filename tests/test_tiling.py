"""Tiling (sdup.tiling): StableSR's tile grid and Gaussian weights, the TiledModel drop-in for samplers,
and the seam-free tiled VAE (exact halos + whole-image GroupNorm statistics) incl. a peak-RSS check.

Measured on the dev box (2 CPU cores, fp32), for the record:
* tiled_decode vs vae.decode (tiny VAEs, 15-24 tiles, exact halos): max |diff| ~3e-6 with max |ref| ~3.5
  (float summation order only); one tile: ~3e-6.  tiled_encode: ~3e-7 with max |ref| ~0.45.
* seams (flat and gradient latents, 9 tiles, max|ref| 3.5-4.9): excess jump over the untiled image 3.6e-6 /
  5.7e-6; with a too-small halo (approximate mode, halo=1 / 0 latent px) 0.11-0.30; a naive per-tile decode
  (per-tile GroupNorm, no halo, no blending) 2.3-2.6.
* memory (f=4 tiny VAE, 128x128 latent -> 512x512, math attention): peak RSS above baseline untiled 2077 MiB (the
  16384^2 attention logits and softmax), tiled 92 MiB (store_bytes 32 MiB).
"""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import assert_parity, randomize_
from sdup.diffusion import samplers as S
from sdup.diffusion.denoisers import CFG, DiffusionWrapper, DiscreteDenoiser
from sdup.diffusion.schedules import ldm_linear_betas
from sdup.models.unet import UNet, UNetConfig
from sdup.models.vae import AutoencoderKL, VAEConfig
from sdup.tiling import TiledModel, estimate_vae_bytes, gaussian_weights, tile_grid, tiled_decode, tiled_encode
from sdup.tiling.plan import TileDefaults, default_plan, plan_tiles


pytestmark = pytest.mark.usefixtures("no_grad", "one_thread")  # forward-only, tiny models: one thread (conftest.py)


# ------------------------------------------------------------------------------------------------
# grid and weights


def upstream_grid(size, tile, overlap):
    """StableSR ``p_mean_variance_canvas`` grid, written out as upstream does it (count loop, then offsets)."""
    n, cur = 0, 0
    while cur < size:
        cur = max(n * tile - overlap * n, 0) + tile
        n += 1
    return [size - tile if i == n - 1 else max(i * tile - overlap * i, 0) for i in range(n)]


def test_tile_grid_cases():
    assert tile_grid(100, 64, 8) == [0, 36]                         # last tile forced to the border
    assert tile_grid(120, 64, 8) == [0, 56]                         # exact fit: no extra tile
    assert tile_grid(200, 64, 32) == [0, 32, 64, 96, 128, 136]
    assert tile_grid(64, 64, 32) == [0]
    assert tile_grid(40, 64, 32) == [0]                             # smaller than the tile: one (shrunk) tile
    assert tile_grid(65, 64, 0) == [0, 1]
    for size in range(65, 400, 7):
        for tile, ov in [(64, 32), (64, 8), (96, 48), (64, 0), (32, 31)]:
            if size > tile:
                assert tile_grid(size, tile, ov) == upstream_grid(size, tile, ov), (size, tile, ov)
    with pytest.raises(ValueError):
        tile_grid(100, 64, 64)


def upstream_gaussian_weights(tile_width, tile_height):
    """StableSR ``_gaussian_weights`` (ldm/models/diffusion/ddpm.py), copied formula, one channel."""
    from numpy import exp, pi, sqrt
    latent_width, latent_height = tile_width, tile_height
    var = 0.01
    midpoint = (latent_width - 1) / 2  # -1 because index goes from 0 to latent_width - 1
    x_probs = [exp(-(x - midpoint) * (x - midpoint) / (latent_width * latent_width) / (2 * var)) / sqrt(2 * pi * var)
               for x in range(latent_width)]
    midpoint = latent_height / 2
    y_probs = [exp(-(y - midpoint) * (y - midpoint) / (latent_height * latent_height) / (2 * var))
               / sqrt(2 * pi * var) for y in range(latent_height)]
    return torch.tensor(np.outer(y_probs, x_probs))


@pytest.mark.parametrize("th,tw", [(64, 64), (96, 96), (48, 80), (7, 5)])
def test_gaussian_weights(th, tw):
    ref = gaussian_weights(th, tw, "reference")
    assert ref.dtype == torch.float64 and ref.shape == (th, tw)
    assert torch.equal(ref, upstream_gaussian_weights(tw, th))      # bit for bit
    assert not torch.equal(ref, ref.flip(0))                        # the off-centre y midpoint
    assert torch.equal(ref, ref.flip(1))                            # x is centred
    sym = gaussian_weights(th, tw)
    assert torch.equal(sym, sym.flip(0)) and torch.equal(sym, sym.flip(1))
    assert torch.equal(sym[:, 0], sym[:, -1])
    assert torch.equal(gaussian_weights(th, tw, "uniform"), torch.ones(th, tw, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# TiledModel


def tiny_x4_unet():
    cfg = UNetConfig(in_channels=7, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(2,), num_heads=4, context_dim=32, use_linear_in_transformer=True,
                     num_classes=1000)
    return randomize_(UNet(cfg).eval(), seed=3)


def x4_inputs(B=2, H=12, W=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(B, 4, H, W, generator=g), concat=torch.randn(B, 3, H, W, generator=g),
                context=torch.randn(B, 5, 32, generator=g), y=torch.tensor([20, 350][:B]))


def test_tiled_model_one_tile_is_untiled():
    raw = DiffusionWrapper(tiny_x4_unet())
    d = x4_inputs()
    t = torch.tensor([999, 500])
    ref = raw(d["x"], t, context=d["context"], concat=d["concat"], y=d["y"])
    for tile in (64, (12, 20)):
        out = TiledModel(raw, tile=tile, overlap=4)(d["x"], t, context=d["context"], concat=d["concat"], y=d["y"])
        assert torch.equal(out, ref)


def test_tiled_model_pointwise_is_exact_and_batching():
    d = x4_inputs(H=13, W=22)
    calls = []

    def fn(x, t, concat=None, context=None, y=None):
        calls.append((x.shape[0], tuple(x.shape[-2:]), tuple(context.shape), tuple(y.shape)))
        assert concat.shape[-2:] == x.shape[-2:] and context.shape[0] == x.shape[0] == y.shape[0]
        return x * 2 + concat[:, :1] * t.view(-1, 1, 1, 1)

    t = torch.tensor([3.0, 5.0])
    ref = fn(d["x"], t, concat=d["concat"], context=d["context"], y=d["y"])
    for weights in ("symmetric", "reference", "uniform"):
        for tb in (1, 3):
            calls.clear()
            tm = TiledModel(fn, tile=(6, 8), overlap=(2, 3), tile_batch=tb, weights=weights)
            out = tm(d["x"], t, concat=d["concat"], context=d["context"], y=d["y"])
            n_tiles = len(tile_grid(13, 6, 2)) * len(tile_grid(22, 8, 3))
            assert sum(c[0] for c in calls) == 2 * n_tiles and calls[0][0] == 2 * min(tb, n_tiles)
            assert torch.allclose(out, ref, rtol=0, atol=1e-6), (weights, tb, (out - ref).abs().max())


def test_tiled_model_real_unet_tiles_and_batching():
    raw = DiffusionWrapper(tiny_x4_unet())
    d = x4_inputs()
    t = torch.tensor([999, 500])
    cond = dict(context=d["context"], concat=d["concat"], y=d["y"])
    o1 = TiledModel(raw, tile=8, overlap=4, tile_batch=1)(d["x"], t, **cond)
    o4 = TiledModel(raw, tile=8, overlap=4, tile_batch=4)(d["x"], t, **cond)
    assert o1.shape == (2, 4, 12, 20) and torch.isfinite(o1).all()
    assert (o1 - o4).abs().max().item() <= 1e-5 * max(1.0, o1.abs().max().item())
    # the top-left 4x4 latent px are covered by the first tile only: the output there is that tile's output
    first = raw(d["x"][..., :8, :8], t, context=d["context"], concat=d["concat"][..., :8, :8], y=d["y"])
    assert (o1[..., :4, :4] - first[..., :4, :4]).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="spatial"):
        TiledModel(raw, tile=8, overlap=4)(d["x"], t, bad=torch.zeros(2, 1, 6, 10), **cond)


def test_tiled_model_in_samplers():
    raw = DiffusionWrapper(tiny_x4_unet())
    d = x4_inputs()
    cond = dict(context=d["context"], concat=d["concat"], y=d["y"])
    betas = ldm_linear_betas(0.0001, 0.02)
    ts = [901, 501, 101]
    x_T = torch.randn(2, 4, 12, 20, generator=torch.Generator().manual_seed(7))
    # tiled raw model under the denoiser, one covering tile: same as untiled
    ref = S.sample_ddim(DiscreteDenoiser(raw, betas, "v"), x_T, ts, extra_args=cond, disable=True)
    one = S.sample_ddim(DiscreteDenoiser(TiledModel(raw, tile=64), betas, "v"), x_T, ts, extra_args=cond,
                        disable=True)
    assert torch.equal(one, ref)
    # several tiles: raw model tiled inside CFG (StableSR style) and the whole denoiser tiled (tuple outputs)
    uncond = dict(context=torch.zeros_like(d["context"]))
    a = S.sample_ddim(DiscreteDenoiser(CFG(TiledModel(raw, tile=8, overlap=4, tile_batch=2), 4.0), betas, "v"),
                      x_T, ts, extra_args=dict(cond=cond, uncond=uncond), disable=True)
    tiled_den = TiledModel(DiscreteDenoiser(CFG(raw, 4.0), betas, "v"), tile=8, overlap=4)
    b = S.sample_ddim(tiled_den, x_T, ts, extra_args=dict(cond=cond, uncond=uncond), disable=True)
    assert a.shape == b.shape == x_T.shape and torch.isfinite(a).all() and torch.isfinite(b).all()
    # eps/x0 are affine in the raw output and the blend weights sum to 1: both placements agree
    assert (a - b).abs().max().item() < 1e-4
    e = S.sample_euler(TiledModel(lambda x, s, **k: x / (1 + s.view(-1, 1, 1, 1) ** 2), tile=8, overlap=2),
                       x_T * 10, torch.tensor([10.0, 5.0, 0.0]), disable=True)
    assert torch.isfinite(e).all()


# ------------------------------------------------------------------------------------------------
# tiled VAE


def tiny_vae(ch_mult=(1, 2, 2), seed=1):
    return randomize_(AutoencoderKL(VAEConfig(ch=32, ch_mult=ch_mult, num_res_blocks=1)).eval(), seed=seed)


@pytest.mark.parametrize("ch_mult", [(1, 1, 1), (1, 2, 2)])
def test_tiled_decode_matches_decode(ch_mult):
    vae = tiny_vae(ch_mult)
    z = torch.randn(2, 4, 20, 28, generator=torch.Generator().manual_seed(0))
    ref = vae.decode(z)
    info = {}
    one = tiled_decode(vae, z, info=info)                               # 64 >= 28: one tile
    assert info["tiles"] == 1
    assert_parity(one, ref, what="one tile")
    errs = {}
    for kw in [dict(tile=8, overlap=2), dict(tile=(6, 10), overlap=(0, 3)),
               dict(tile=8, overlap=2, store_bytes=0),                   # always recompute from the mid output
               dict(tile=7, overlap=3, store_bytes=64 << 10)]:           # partly kept, partly recomputed
        out = tiled_decode(vae, z, **kw, info=info)
        assert info["tiles"] > 10
        # exact halos + whole-image GroupNorm statistics: only float summation order differs (~1e-6 measured)
        errs[str(kw)] = assert_parity(out, ref, what=str(kw))
    print(f"tiled decode vs decode: max|Δ| {max(errs.values()):.1e}")


@pytest.mark.parametrize("ch_mult", [(1, 1, 1), (1, 2, 2)])
def test_tiled_encode_matches_encode(ch_mult):
    vae = tiny_vae(ch_mult)
    img = torch.rand(2, 3, 96, 80, generator=torch.Generator().manual_seed(2)) * 2 - 1
    post = vae.encode(img)
    for kw in [dict(), dict(tile=32, overlap=8), dict(tile=(24, 40), overlap=(8, 0), store_bytes=0)]:
        tp = tiled_encode(vae, img, **kw)
        assert_parity(tp.mean, post.mean, what=f"mean {kw}")
        assert_parity(tp.logvar, post.logvar, what=f"logvar {kw}")
    with pytest.raises(ValueError, match="divisible"):
        tiled_encode(vae, img[..., :90, :])


def test_tiled_vae_resumes_resblocks_at_their_second_norm():
    """A tile stopped at a ResBlock's second GroupNorm resumes there (``ResBlock.second``): no first convolution
    runs twice, and the result is bit for bit the rerun-from-the-input one (a no-op hook on every ResBlock forces
    that path), the same ops on the same values."""
    from sdup.nn import ResBlock
    vae = tiny_vae((1, 2, 2))
    z = torch.randn(1, 4, 16, 20, generator=torch.Generator().manual_seed(4))
    blocks = [m for m in vae.decoder.modules() if isinstance(m, ResBlock)]
    conv1 = []
    handles = [b.conv1.register_forward_pre_hook(lambda *a: conv1.append(1)) for b in blocks]
    try:
        info = {}
        resumed = tiled_decode(vae, z, tile=6, overlap=2, info=info)
        n_resumed = len(conv1)
        handles += [b.register_forward_hook(lambda m, a, out: out) for b in blocks]  # hooks: rerun the stage
        conv1.clear()
        rerun = tiled_decode(vae, z, tile=6, overlap=2)
    finally:
        for h in handles:
            h.remove()
    mid = sum(isinstance(m, ResBlock) for m in vae.decoder.mid.modules())  # on the whole map, once each
    tiled_blocks = len(blocks) - mid
    assert n_resumed == mid + tiled_blocks * info["tiles"]           # each tiled ResBlock's conv1 once per tile
    assert len(conv1) == mid + 2 * tiled_blocks * info["tiles"]      # rerun: twice (to the norm, then to the end)
    assert torch.equal(resumed, rerun)


def test_tiled_vae_runs_the_modules_own_forwards():
    """The tiled decode / encode call the VAE's own stages: a forward hook on a decoder ResBlock, an upsample and
    an encoder ResBlock (here: an affine change of their outputs) is seen by the tiled passes as by the untiled ones."""
    vae = tiny_vae((1, 2, 2))
    z = torch.randn(1, 4, 16, 20, generator=torch.Generator().manual_seed(4))
    img = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(5)) * 2 - 1
    hooked = [vae.decoder.up[1].res[0], vae.decoder.up[0].upsample, vae.encoder.down[1].res[0]]
    calls = []

    def hook(module, args, out):
        calls.append(tuple(out.shape))
        return out * 1.5 + 0.25
    plain = vae.decode(z), vae.encode(img).mean
    handles = [m.register_forward_hook(hook) for m in hooked]
    try:
        ref, ref_mean = vae.decode(z), vae.encode(img).mean
        calls.clear()
        info = {}
        out = tiled_decode(vae, z, tile=6, overlap=2, info=info)
        assert len(calls) == 2 * info["tiles"] == 40                   # each hooked decoder stage once per tile
        mean = tiled_encode(vae, img, tile=24, overlap=8).mean
    finally:
        for h in handles:
            h.remove()
    assert_parity(out, ref, what="hooked tiled decode")
    assert_parity(mean, ref_mean, what="hooked tiled encode")
    assert (ref - plain[0]).abs().max() > 1e-2 and (ref_mean - plain[1]).abs().max() > 1e-2  # the hooks matter


def test_tiled_vae_refuses_stages_it_cannot_tile():
    vae = tiny_vae((1, 2, 2))
    z = torch.randn(1, 4, 8, 8)
    vae.decoder.up[1].res[0].time_proj = torch.nn.Linear(4, 64)       # a UNet-style ResBlock
    with pytest.raises(ValueError, match="Linear"):
        tiled_decode(vae, z, tile=4, overlap=2)


def seam_excess(img, ref, cuts_y, cuts_x):
    """max over tile-border rows/columns of (|jump| tiled - |jump| untiled), jump = difference of neighbours."""
    ex = 0.0
    for c in cuts_y:
        j, jr = (img[..., c, :] - img[..., c - 1, :]).abs(), (ref[..., c, :] - ref[..., c - 1, :]).abs()
        ex = max(ex, (j - jr).max().item())
    for c in cuts_x:
        j, jr = (img[..., c] - img[..., c - 1]).abs(), (ref[..., c] - ref[..., c - 1]).abs()
        ex = max(ex, (j - jr).max().item())
    return ex


def test_tiled_decode_has_no_seams():
    vae = tiny_vae((1, 2, 2))
    f, T, O, H, W = 4, 10, 4, 24, 24
    flat = torch.full((1, 4, H, W), 0.7)
    ramp = torch.linspace(-2, 2, W).view(1, 1, 1, W) * torch.tensor([1.0, -0.5, 0.3, 0.8]).view(1, 4, 1, 1)
    grad = ramp.expand(1, 4, H, W) + torch.linspace(-1, 1, H).view(1, 1, H, 1)
    starts = tile_grid(H, T, O)
    cuts = sorted({f * s for s in starts[1:]} | {f * (s + T) for s in starts[:-1]})
    for z in (flat, grad):
        ref = vae.decode(z)
        out = tiled_decode(vae, z, tile=T, overlap=O)
        ours = seam_excess(out, ref, cuts, cuts)
        # naive tiling (what per-tile GroupNorm and no halo does), stitched without blending, for contrast
        naive = torch.empty_like(ref)
        for y in starts:
            for x in starts:
                naive[..., f * y:f * (y + T), f * x:f * (x + T)] = vae.decode(z[..., y:y + T, x:x + T])
        naive_ex = seam_excess(naive, ref, cuts, cuts)
        scale = ref.abs().max().item()
        assert ours <= 1e-5 * max(1.0, scale), ours      # measured ~4e-6: the seams are those of the untiled image
        assert naive_ex > 1e3 * max(ours, 1e-6), (naive_ex, ours)


def test_memory_estimate_of_the_vae():
    sd = VAEConfig()
    assert estimate_vae_bytes(sd, (1, 4, 64, 64)) < 8 << 30                # 512^2 decode fits in 8 GiB
    assert estimate_vae_bytes(sd, (1, 4, 512, 512)) > 8 << 30              # 4096^2 does not, untiled
    assert estimate_vae_bytes(sd, (1, 4, 512, 512), tile=64, halo=16, store_bytes=1 << 30) < 8 << 30
    assert estimate_vae_bytes(sd, (1, 3, 4096, 4096), kind="encode", tile=64, halo=11) < \
        estimate_vae_bytes(sd, (1, 3, 4096, 4096), kind="encode")


def test_tile_plan_rounds_once_and_counts_like_the_runners():
    """``plan_tiles``: the tile rounded down to the multiple, the overlap below it; the counts are the grids that
    ``TiledModel`` and ``tiled_decode`` run; ``default_plan`` switches tiling on above the defaults."""
    plan = plan_tiles((40, 70), tile=21, overlap=30, vae_tile=16, vae_overlap=4, multiple=8)
    assert (plan.tile, plan.overlap, plan.vae_tile, plan.vae_overlap) == (16, 8, 16, 4)
    th, tw, tiles = plan.wrap(lambda x, t: x).grid(40, 70)
    assert (th, tw) == (16, 16) and plan.latent_tiles == len(tiles)
    info = {}
    tiled_decode(tiny_vae(), torch.zeros(1, 4, 40, 70), tile=plan.vae_tile, overlap=plan.vae_overlap, info=info)
    assert plan.vae_tiles == info["tiles"]
    assert plan.parameters() == {"tile": 16, "overlap": 8, "vae_tile": 16, "vae_overlap": 4}
    assert plan_tiles((40, 70)).parameters() is None and plan_tiles((40, 70)).wrap(abs) is abs
    small, big = default_plan((64, 64), TileDefaults(), 8), default_plan((64, 200), TileDefaults(), 8)
    assert small.tile is None and small.vae_tile is None
    assert (big.tile, big.overlap, big.vae_tile, big.vae_overlap, big.latent_tiles) == (128, 32, 128, 8, 2)


MEM_SCRIPT = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    from helpers import randomize_
    from sdup.models.vae import AutoencoderKL, VAEConfig
    from sdup.nn import set_attention_backend
    from sdup.tiling import tiled_decode
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)
    set_attention_backend("math")       # the reference attention: untiled needs the full N x N logits
    vae = randomize_(AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1)).eval(), seed=1)
    z = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(0))
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    try:
        open("/proc/self/clear_refs", "w").write("5")   # reset the peak (VmHWM) to the current RSS
    except OSError:
        pass
    base, t0 = status("VmRSS"), time.time()
    if sys.argv[1] == "tiled":
        out = tiled_decode(vae, z, tile=32, overlap=8, store_bytes=32 << 20)
    else:
        out = vae.decode(z)
    print(json.dumps(dict(peak=status("VmHWM") - base, seconds=time.time() - t0, shape=list(out.shape),
                          finite=bool(torch.isfinite(out).all()))))
""")


def run_mem(mode):
    code = MEM_SCRIPT.format(tests=str(Path(__file__).parent))
    res = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # RSS depends on the allocator and the kernel; 30 s
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_tiled_decode_peak_memory():
    tiled = run_mem("tiled")
    untiled = run_mem("untiled")
    print(f"\npeak RSS above baseline: tiled {tiled['peak'] / 2**20:.0f} MiB ({tiled['seconds']:.1f} s), "
          f"untiled {untiled['peak'] / 2**20:.0f} MiB ({untiled['seconds']:.1f} s)")
    assert tiled["finite"] and tiled["shape"] == [1, 3, 512, 512]
    assert untiled["peak"] > 1 << 30             # 16384 tokens: 1 GiB of fp32 logits (math backend), + softmax
    # mid maps 2 MiB, output 3 MiB, store 32 MiB, tiles, chunked logits: measured 88 MiB against 2077 MiB
    assert tiled["peak"] < min(512 << 20, untiled["peak"] / 4)
