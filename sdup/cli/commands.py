"""``python -m sdup`` — command-line entry points (inspect, convert, upscale, serve).

User mistakes (missing files, unsupported or corrupt checkpoints, bad options) end in one clear
line on stderr and exit code 2, never a traceback; ``inspect`` also exits 2 when the checkpoint has a problem or
missing / unexpected keys.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..checkpoints import load, save_sdup
from ..checkpoints.detect import FAMILY_NAMES
from ..checkpoints.export import save_diffusers, save_ldm
from ..checkpoints.io import CheckpointError
from ..checkpoints.keymap import KeyMismatch
from ..checkpoints.loader import inspect
from ..fileio import Terminated, sigterm_as_interrupt
from ..images import one_line
from ..pipelines.result import DTYPES
from .arguments import UPSCALE_DOC, add_upscale_arguments
from .upscale import cmd_upscale, upscale_main


def fail(msg: str, code: int = 2):
    print(f"error: {one_line(msg)}", file=sys.stderr)
    raise SystemExit(code)


def cmd_inspect(args) -> int:
    path = Path(args.path)
    if not path.exists():
        fail(f"{path}: no such file or folder")
    det, model, error = inspect(path, config=args.config)
    print(f"file:      {path}")
    print(f"detected:  {det}")
    print(f"family:    {FAMILY_NAMES.get(det.family, det.family)}")
    if error:
        print(f"problem:   {error}")
        return 2
    if model.prediction:
        print(f"prediction: {model.prediction}   latent scale: {model.scale_factor}")
    rep = model.report
    for comp, module in model.components().items():
        n_params = sum(p.numel() for p in module.parameters())
        print(f"  {comp:15s} {rep.get(comp, 0):5d} tensors from the file -> {len(module.state_dict()):5d} sdup tensors, "
              f"{n_params / 1e6:8.2f}M parameters")
    for reason, n in rep.get("dropped", {}).items():
        print(f"  dropped on purpose: {n:4d}  {reason}")
    bad = rep.get("mismatch", {})
    for what, mm in bad.items():
        for label in ("missing", "unexpected"):
            for k in mm[label][:args.max_keys]:
                print(f"  {label:10s} [{what}] {k}")
            if len(mm[label]) > args.max_keys:
                print(f"  ... {len(mm[label]) - args.max_keys} more {label} in {what}")
    total = sum(len(m["missing"]) + len(m["unexpected"]) for m in bad.values())
    print("keys:      all consumed, none missing" if not total else f"keys:      {total} missing/unexpected (see above)")
    absent = _absent_components(path, model)
    if absent:
        print(f"missing:   {', '.join(absent)} (listed in model_index.json, not in the folder)")
    return 2 if total or absent else 0


def _absent_components(path: Path, model) -> list[str]:
    """The parts of a diffusers pipeline folder that its model_index.json names but that could not be loaded."""
    index = path / "model_index.json"
    if not index.is_file():
        return []
    listed = json.loads(index.read_text())
    return [c for c in ("unet", "vae", "text_encoder") if c in listed and c not in model.components()]


def cmd_convert(args) -> int:
    out = Path(args.output)
    fmt = args.to or ("diffusers" if out.suffix == "" else "sdup" if out.name.endswith(".sdup.safetensors") else "ldm")
    model = load(args.input, config=args.config, ema=args.ema, variant=args.variant,
                 dtype=DTYPES[args.dtype])
    if fmt == "sdup":
        save_sdup(model, out)
    elif fmt == "ldm":
        save_ldm(model, out)
    else:
        save_diffusers(model, out)
    print(f"wrote {out} ({fmt} layout, {model.family})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdup", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("inspect", help="detected family, per-component key counts, missing/unexpected keys")
    i.add_argument("path", help="checkpoint file, diffusers folder, or key manifest JSON")
    i.add_argument("--config", help="upstream-style YAML (for non-standard sizes)")
    i.add_argument("--max-keys", type=int, default=20, help="list at most this many missing/unexpected keys per part")
    i.set_defaults(fn=cmd_inspect)
    c = sub.add_parser("convert", help="original single file <-> diffusers folder <-> sdup safetensors")
    c.add_argument("input")
    c.add_argument("output", help="a folder (diffusers), NAME.sdup.safetensors (sdup) or NAME.safetensors/.ckpt (original)")
    c.add_argument("--to", choices=["ldm", "diffusers", "sdup"], help="output layout (default: from the output name)")
    c.add_argument("--config", help="upstream-style YAML for the input")
    c.add_argument("--ema", action="store_true", help="use the model_ema.* UNet weights of a -full-ema file")
    c.add_argument("--variant", help="diffusers weight variant to read, e.g. fp16")
    c.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    c.set_defaults(fn=cmd_convert)
    u = sub.add_parser("upscale", help="upscale images, folders or globs (same as scripts/upscale.py)",
                       description=UPSCALE_DOC.splitlines()[0], epilog="\n".join(UPSCALE_DOC.splitlines()[1:]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_upscale_arguments(u)
    u.set_defaults(fn=cmd_upscale)
    sub.add_parser("serve", help="a local web page to upscale and compare (python -m sdup serve --help)",
                   add_help=False)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["upscale"]:  # the same one-line argument errors as scripts/upscale.py
        return upscale_main(argv[1:], prog="python -m sdup upscale")
    if argv[:1] == ["serve"]:  # the web page (sdup.web: Gradio is imported there only)
        from ..web.serve import serve_main
        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():
            return args.fn(args)
    except KeyboardInterrupt as e:
        print(f"error: {'terminated' if isinstance(e, Terminated) else 'interrupted'} (no partial output written)",
              file=sys.stderr)
        return 2
    except KeyMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"error: {one_line(str(e).splitlines()[0] if str(e) else type(e).__name__)}", file=sys.stderr)
        return 2
