"""Write a full-size checkpoint with random weights in the official single-file layout (for pipeline runs, memory and
speed measurements without the real weights; the images it makes are noise).

    python scripts/random_weights.py x4 /tmp/x4-random.safetensors          # configs/x4-upscaling.yaml
    python scripts/random_weights.py sd1 /tmp/sd14-random.ckpt --config configs/sd1-inference.yaml
    python scripts/random_weights.py manifest /tmp/stablesr-random.ckpt --manifest tests/data/manifests/stablesr_000117.json

Weights: N(0, 1/fan_in) (activations keep their scale through the network), norm scales 1, biases 0; seeded.
The file loads with ``sdup.load`` / ``scripts/upscale.py --weights`` like the official one.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sdup.checkpoints.export import save_ldm  # noqa: E402
from sdup.cli.planning import meta_model_from_yaml, repo_configs  # noqa: E402

DEFAULT_CONFIGS = {"x4": "x4-upscaling.yaml", "sd1": "sd1-inference.yaml", "sd2": "sd2-inference.yaml"}


@torch.no_grad()
def randomize(module: torch.nn.Module, g: torch.Generator) -> None:
    module.to_empty(device="cpu")
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.normal_(0, fan_in ** -0.5, generator=g)
        elif name.endswith("weight") and ("norm" in name or "ln" in name):
            p.fill_(1.0)
        elif name.endswith("positional_embedding") or name.endswith("class_embedding"):
            p.normal_(0, 0.01, generator=g)
        else:
            p.zero_()
    if hasattr(module, "init_buffers"):
        module.init_buffers()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("family", choices=sorted(DEFAULT_CONFIGS) + ["manifest"],
                    help="a family with an official YAML in configs/, or 'manifest': the architecture of a key/shape "
                         "manifest (--manifest; e.g. StableSR and its CFW VAE)")
    ap.add_argument("--manifest", help="key/shape manifest (tests/data/manifests/*.json) for family 'manifest'")
    ap.add_argument("output", help=".safetensors or .ckpt")
    ap.add_argument("--config", help="upstream YAML (default: the official one in configs/)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.family == "manifest":
        from sdup.checkpoints.loader import inspect
        if not args.manifest:
            ap.error("family 'manifest' needs --manifest")
        det, model, error = inspect(Path(args.manifest))
        if model is None:
            ap.error(f"{args.manifest}: {error}")
        print(f"{args.manifest}: {det.family}")
    else:
        model = meta_model_from_yaml(args.family, args.config or str(repo_configs() / DEFAULT_CONFIGS[args.family]))
    g = torch.Generator().manual_seed(args.seed)
    for name, m in model.components().items():
        randomize(m, g)
        print(f"{name}: {sum(p.numel() for p in m.parameters()) / 1e6:.2f} M parameters")
    save_ldm(model, args.output)
    print(f"wrote {args.output} ({Path(args.output).stat().st_size / 2**30:.2f} GiB) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
