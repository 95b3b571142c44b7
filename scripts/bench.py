#!/usr/bin/env python
"""Benchmark sdup against diffusers on the same random full-size weights, in one run.

    python scripts/bench.py                       # all models, 3 timed runs each, 2 threads
    python scripts/bench.py --models sd14-unet --runs 5 --out bench.md

For each model: both implementations get identical weights (diffusers' random init, converted with
sdup's key tables), the outputs are checked to agree, then each is timed (1 warm-up, median of --runs)
under torch.inference_mode with a fixed thread count. GFLOP/s come from torch's FlopCounterMode.
Not a test: run it on demand (it needs several GB of RAM and minutes of CPU).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sdup.checkpoints import diffusers as dfs  # noqa: E402
from sdup.models.unet import UNet  # noqa: E402
from sdup.models.vae import AutoencoderKL  # noqa: E402

CONFIGS = json.loads((ROOT / "tests/data/manifests/diffusers_configs.json").read_text())["configs"]
SD1, X4, X2 = "CompVis/stable-diffusion-v1-4", "stabilityai/stable-diffusion-x4-upscaler", "stabilityai/sd-x2-latent-upscaler"
SD21_UNET = dict(CONFIGS[SD1]["unet"], attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True)


def cfg(repo, comp):
    return {k: v for k, v in CONFIGS[repo][comp].items() if not k.startswith("_")}


def unet_case(dcfg, h, w, batch=2):
    from diffusers import UNet2DConditionModel
    ref = UNet2DConditionModel(**dcfg).eval()
    c = dfs.unet_config(dict(ref.config))
    mine = UNet(c).eval()
    mine.load_state_dict(dfs.unet_keymap(c, mine.state_dict()).to_sdup(ref.state_dict()))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c.in_channels, h, w, generator=g)
    t = torch.full((batch,), 500)
    ctx = torch.randn(batch, 77, c.context_dim, generator=g)
    y = torch.full((batch,), 20) if c.num_classes else None
    return (lambda: mine(x, t, ctx, y=y)), (lambda: ref(x, t, encoder_hidden_states=ctx, class_labels=y).sample)


def kunet_case(h, w, batch=2):
    from diffusers import UNet2DConditionModel
    from sdup.checkpoints.diffusers import kunet_diffusers_keymap
    from sdup.models.latent_upscaler import KUNet, KUNetConfig
    ref = UNet2DConditionModel(**cfg(X2, "unet")).eval()
    c = KUNetConfig.from_diffusers(dict(ref.config))
    mine = KUNet(c).eval()
    mine.load_state_dict(kunet_diffusers_keymap(c).to_sdup(ref.state_dict()))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 8, h, w, generator=g)
    c_noise = torch.full((batch,), 0.5)
    cond = torch.randn(batch, 896, generator=g)
    ctx = torch.randn(batch, 77, 768, generator=g)
    return (lambda: mine(x, c_noise, cond, ctx)), (lambda: ref(x, c_noise, encoder_hidden_states=ctx, timestep_cond=cond).sample)


def vae_decode_case(repo, h, w):
    from diffusers import AutoencoderKL as Ref
    ref = Ref(**cfg(repo, "vae")).eval()
    c = dfs.vae_config(dict(ref.config))
    mine = AutoencoderKL(c).eval()
    mine.load_state_dict(dfs.vae_keymap(c, mine.state_dict()).to_sdup(ref.state_dict()))
    z = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(0))
    return (lambda: mine.decode(z)), (lambda: ref.decode(z).sample)


CASES = {
    "sd14-unet": ("SD 1.4 UNet, 64x64 latent, batch 2", lambda: unet_case(cfg(SD1, "unet"), 64, 64)),
    "sd21-unet": ("SD 2.1 UNet, 64x64 latent, batch 2", lambda: unet_case(SD21_UNET, 64, 64)),
    "x4-unet": ("x4 UNet, 128x128 latent, batch 2", lambda: unet_case(cfg(X4, "unet"), 128, 128)),
    "x2-kunet": ("x2 K-UNet, 128x128, batch 2", lambda: kunet_case(128, 128)),
    "vae-f8-decode": ("SD VAE decode to 512x512", lambda: vae_decode_case(SD1, 64, 64)),
    "vae-f4-decode": ("x4 VAE decode to 512x512", lambda: vae_decode_case(X4, 128, 128)),
}


def timed(fn, runs):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops(fn):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="also write the markdown table here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"torch {torch.__version__}, {args.threads} threads, median of {args.runs} runs, fp32, CPU", "",
             "| model | sdup s | diffusers s | sdup/diffusers | sdup GFLOP/s | max abs diff |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name in args.models:
        label, make = CASES[name]
        torch.manual_seed(0)
        with torch.inference_mode():
            mine, ref = make()
            a, b = mine(), ref()
            diff = (a - b).abs().max().item()
            t_mine, t_ref = timed(mine, args.runs), timed(ref, args.runs)
            gflops = flops(mine) / 1e9
        line = f"| {label} | {t_mine:.2f} | {t_ref:.2f} | {t_mine / t_ref:.2f} | {gflops / t_mine:.0f} | {diff:.1e} |"
        lines.append(line)
        print(line, flush=True)
        del mine, ref
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
