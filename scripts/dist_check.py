#!/usr/bin/env python
"""Check one job split over processes against one process, on any device (a GPU machine's check; the CPU one is
tests/test_distributed.py), and time the tiled VAE decode's parts.

    python scripts/dist_check.py run one.pt --device cuda                        # the single-process reference
    SDUP_DIST_BACKEND=gloo torchrun --standalone --nproc-per-node 2 scripts/dist_check.py run two.pt --device cuda
    python scripts/dist_check.py run nccl.pt --device cuda --nccl-world-one     # the nccl exchange, one rank
    python scripts/dist_check.py compare one.pt two.pt nccl.pt                   # max |difference| per case
    python scripts/dist_check.py time-decode --device cuda --latent 256 512      # full-size x4 VAE: mid vs tiles

``run`` uses the tiny random-weight fixtures in tests/data/fixtures: the x4, StableSR and x2 pipelines with latent
tiles (x4 also with the tiled VAE decode), then ``tiled_decode`` / ``tiled_encode`` alone (batch 2, 3 x 5 tiles, the
mid attention in 15 chunks). With one GPU, two ranks share it through gloo (their tensors go through the host);
``--nccl-world-one`` runs the nccl path (``all_gather`` of CUDA buffers) in a group of one.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "data" / "fixtures"


def cases(device: str, group) -> dict:
    import sdup
    from sdup.pipelines.stablesr import upscale_stablesr
    from sdup.tiling import tiled_decode, tiled_encode
    from sdup.pipelines.x2_latent import upscale_latents_x2
    from sdup.pipelines.x4 import upscale_x4
    g = torch.Generator().manual_seed(0)
    out = {}
    d = FIXTURES / "stablesr"
    model = sdup.load(d / "model.ckpt", config=d / "config.yaml", device=device)
    cfw = sdup.load(d / "cfw_vae.ckpt", config=d / "cfw_vae_config.yaml", device=device)
    r = upscale_stablesr(model, cfw, torch.rand(1, 3, 12, 20, generator=g), steps=2, input_size=32, sampler="ddim",
                         guidance=3.0, negative_prompt=[3, 4, 5], seed=5, tile=8, tile_overlap=4, vae_tile=6, vae_overlap=2,
                         progress=False, group=group)
    out["stablesr"] = r.images
    model = sdup.load(FIXTURES / "latent_upscaler" / "diffusers", device=device)
    text = dict(prompt_embeds=torch.randn(1, 77, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g))
    r = upscale_latents_x2(model, torch.randn(1, 4, 8, 12, generator=g), **{k: v.to(device) for k, v in text.items()},
                           steps=2, guidance=1.0, seed=2, tile=16, tile_overlap=8, decode=False, progress=False,
                           group=group)
    out["x2"] = r.latents
    model = sdup.load(FIXTURES / "x4" / "model.ckpt", config=FIXTURES / "x4" / "config.yaml", device=device)
    r = upscale_x4(model, torch.rand(1, 3, 12, 20, generator=g), [5, 6, 7], steps=2, seed=1, tile=8, tile_overlap=4,
                   vae_tile=6, vae_overlap=2, progress=False, group=group)
    out["x4"] = r.images
    vae = model.vae
    with torch.inference_mode():
        z = torch.randn(2, 4, 12, 20, generator=g).to(device)
        out["decode"] = tiled_decode(vae, z, tile=6, overlap=2, attn_chunk=16, group=group).cpu()
        out["decode_one_tile"] = tiled_decode(vae, z, tile=32, overlap=2, attn_chunk=16, group=group).cpu()
        img = (torch.rand(2, 3, 24, 40, generator=g) * 2 - 1).to(device)
        out["encode"] = tiled_encode(vae, img, tile=12, overlap=4, attn_chunk=16, group=group).mean.cpu()
    return out


def cmd_run(args) -> int:
    from sdup import distributed
    if args.nccl_world_one:
        import torch.distributed as dist
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
        group = distributed.Group(rank=0, world_size=1, device="cuda:0", backend="nccl")
    else:
        group = distributed.from_environment()
    t0 = time.perf_counter()
    out = cases(args.device, group)
    if group is None or group.is_main:
        torch.save(out, args.output)
        print(f"run: {len(out)} cases in {time.perf_counter() - t0:.1f} s on {args.device}"
              f"{'' if group is None else f', {group.world_size} rank(s), {group.backend}'} -> {args.output}")
    distributed.close(group)
    return 0


def cmd_compare(args) -> int:
    ref = torch.load(args.files[0])
    bad = 0
    for other in args.files[1:]:
        got = torch.load(other)
        for k, a in ref.items():
            b = got[k]
            same = torch.equal(a, b)
            bad += not same
            print(f"{Path(other).name:>10} {k:>16}: {'bit-identical' if same else 'max |diff| %.3g' % (a - b).abs().max()}"
                  f"  (max |ref| {a.abs().max():.3g})")
    return 1 if bad else 0


def cmd_time_decode(args) -> int:
    """Full-size x4 VAE (random weights), one latent of each --latent size: the whole-map part (conv_in + mid block,
    its attention over all positions in chunks) against the whole tiled decode (128-px tiles), each timed once
    after a warm-up on a small latent."""
    from sdup.checkpoints import diffusers as dfs
    from sdup.models.vae import AutoencoderKL
    from sdup.tiling.vae import _chunked_attention, tiled_decode
    import json
    cfg = json.loads((ROOT / "tests/data/manifests/diffusers_configs.json").read_text())["configs"]
    vcfg = dfs.vae_config(cfg["stabilityai/stable-diffusion-x4-upscaler"]["vae"])
    vae = AutoencoderKL(vcfg).eval().to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    stages = vae.decoder.stages(None)
    m = stages.index(vae.decoder.mid) + 1

    def whole(z):
        h = vae.post_quant_conv(z)
        with _chunked_attention(z.shape[-2] * z.shape[-1], None):
            for stage in stages[:m]:
                h = stage(h)
        return h

    def timed(fn, z):
        sync()
        t0 = time.perf_counter()
        fn(z)
        sync()
        return time.perf_counter() - t0

    decode = lambda z: tiled_decode(vae, z, tile=128, overlap=8)  # noqa: E731
    with torch.inference_mode():
        small = torch.randn(1, 4, 160, 160, device=args.device)  # 2 x 2 tiles: every kernel compiled / chosen
        whole(small), decode(small)
        for n in args.latent:
            z = torch.randn(1, 4, n, n, device=args.device)
            mid, total = timed(whole, z), timed(decode, z)
            print(f"x4 VAE tiled decode of a {n}x{n} latent ({4 * n}x{4 * n} px) on {args.device}, fp32: {total:.2f} s,"
                  f" of which conv_in + mid block on the whole map {mid:.2f} s ({100 * mid / total:.0f} %)", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("output")
    r.add_argument("--device", default="cpu")
    r.add_argument("--nccl-world-one", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("files", nargs="+")
    t = sub.add_parser("time-decode")
    t.add_argument("--device", default="cpu")
    t.add_argument("--latent", type=int, nargs="+", default=[256])
    args = p.parse_args(argv)
    return {"run": cmd_run, "compare": cmd_compare, "time-decode": cmd_time_decode}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
