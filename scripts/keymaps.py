"""Write the key tables a person can read: ``docs/keymaps/<manifest>.md``, one per official checkpoint layout
in ``tests/data/manifests`` (and one for the k-diffusion x2 file, which has no manifest): every key of the official file, the sdup tensor it loads into (with the shape
conversion, if any), or the reason it is skipped.

The tables are not written by hand: each manifest is loaded on the meta device by ``sdup``'s own loader, and
the rows come from the key maps it used (``LoadedModel.keymaps``) and the keys it dropped
(``LoadedModel.dropped``). ``tests/test_keymap_docs.py`` fails when a file is stale.

    python scripts/keymaps.py            # rewrite docs/keymaps/*.md
    python scripts/keymaps.py --check    # exit 1 and name the stale files instead of writing
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sdup.checkpoints import read_shapes  # noqa: E402
from sdup.checkpoints.keymap import COPY  # noqa: E402
from sdup.checkpoints.loader import load_state_dict  # noqa: E402

MANIFESTS = ROOT / "tests" / "data" / "manifests"
OUT = ROOT / "docs" / "keymaps"
NOT_CHECKPOINTS = ("index.json", "diffusers_configs.json")
FULL_EMA = "sd-v1-4-full-ema.model_ema_keys.json"  # the extra keys of sd-v1-4-full-ema.ckpt, beside sd-v1-4.json's
# No manifest: the k-diffusion .pth of the x2 upscaler; its keys are those sdup exports for the released config
# (tests/test_latent_upscaler_unet.py checks that key set against the published shapes).
KDIFFUSION = "kdiffusion_sd-x2-latent-upscaler"
REGENERATE = "python scripts/keymaps.py"


def sources() -> list[str]:
    """The manifests' file names, plus ``KDIFFUSION``."""
    return sorted(p.name for p in MANIFESTS.glob("*.json") if p.name not in NOT_CHECKPOINTS) + [KDIFFUSION]


def read(name: str) -> tuple[dict, dict]:
    """({key: shape}, metadata) of one source."""
    if name != KDIFFUSION:
        return read_shapes(MANIFESTS / name)
    from dataclasses import replace

    from sdup.checkpoints.kdiffusion import kunet_kdiffusion_keymap
    from sdup.models.latent_upscaler import KUNet, KUNetConfig
    cfg = replace(KUNetConfig(), noise_aug_embed=True)  # laion_text_cond_latent_upscaler_2 + the wrapper's embed
    with torch.device("meta"):
        sd = KUNet(cfg).state_dict()
    return {k: tuple(v.shape) for k, v in kunet_kdiffusion_keymap(cfg).to_ext(sd).items()}, {}


def _meta(shapes: dict) -> dict:
    return {k: torch.empty(tuple(s), device="meta") for k, s in shapes.items()}


def _shape(s) -> str:
    return "[" + ", ".join(str(d) for d in s) + "]"


def _n(keys) -> str:
    return f"{len(keys)} key" + ("" if len(keys) == 1 else "s")


def _dotted_prefix(keys: list[str]) -> str:
    """The longest common prefix of ``keys`` that ends with a dot ("" if none)."""
    common = os.path.commonprefix(keys)
    return common[:common.rfind(".") + 1]


def rows(name: str):
    """(model, {official key: (component, sdup keys, sdup shapes, op name)}, {official key: reason}) for one
    source; every key of it is in exactly one of the two dicts (checked)."""
    shapes, meta = read(name)
    file = shapes
    if name == FULL_EMA:  # loaded the way it is used: with the rest of the file and ema=True
        base, meta = read_shapes(MANIFESTS / "sd-v1-4.json")
        file = {**base, **shapes}
    model = load_state_dict(_meta(file), name=name, metadata=meta, device="meta", dtype=None, ema=name == FULL_EMA)
    mapped = {}
    for comp, km in model.keymaps.items():
        for e in km.entries:
            ext = list(e.ext)
            if not all(k in file for k in ext):
                raise AssertionError(f"{name}: the loader's map names keys the file lacks: {ext}")
            if not any(k in shapes for k in ext):
                continue  # FULL_EMA: a key of sd-v1-4.json
            sdup_shapes = [tuple(t.shape) for t in e.to_sdup([torch.empty(file[k], device="meta") for k in ext])]
            for i, k in enumerate(ext):
                op = e.op.name if len(ext) == 1 else f"{e.op.name}: part {i + 1} of {len(ext)} (dim 0)"
                mapped[k] = (comp, e.sdup, sdup_shapes, op)
    dropped = {k: reason for reason, keys in model.dropped.items() for k in keys if k in shapes}
    both, neither = set(mapped) & set(dropped), set(shapes) - set(mapped) - set(dropped)
    if both or neither:
        raise AssertionError(f"{name}: keys both mapped and dropped {sorted(both)[:3]}, neither {sorted(neither)[:3]}")
    return model, mapped, dropped


def render(name: str) -> str:
    model, mapped, dropped = rows(name)
    shapes, _ = read(name)
    index = json.loads((MANIFESTS / "index.json").read_text()).get(name, {})
    n_sdup = len({k for _, sdup, _, _ in mapped.values() for k in sdup})
    source = "the K-UNet's key map" if name == KDIFFUSION else f"tests/data/manifests/{name}"
    out = [f"# `{name}`", "",
           f"<!-- generated by scripts/keymaps.py from {source} with sdup's loader: do not edit, run `{REGENERATE}` -->",
           ""]
    if index.get("official_file"):
        out += [f"Official file: {index['official_file']}.", ""]
    if name == KDIFFUSION:
        out += ["Official file: stabilityai/sd-x2-latent-upscaler's original k-diffusion checkpoint "
                "`laion_text_cond_latent_upscaler_2_1_00470000_slim.pth`, dict key `model_ema` (no manifest: the keys "
                "are what sdup exports for the released config, checked against the published shapes by "
                "tests/test_latent_upscaler_unet.py).", ""]
    out += [f"Family `{model.family}`. {len(shapes)} keys: {len(mapped)} loaded into {n_sdup} sdup tensors, "
            f"{len(dropped)} skipped on purpose. Conventions: [README.md](README.md).", ""]
    if name == FULL_EMA:
        out += ["Loaded with `ema=True`, next to the keys of `sd-v1-4.json`: these EMA copies replace the "
                "`model.diffusion_model.*` weights.", ""]
    for comp in model.keymaps:
        keys = [k for k in shapes if k in mapped and mapped[k][0] == comp]
        if not keys:
            continue
        ext_prefix, sdup_prefix = _dotted_prefix(keys), f"{comp}."
        official = f"official key (`{ext_prefix}…`)" if ext_prefix else "official key"
        out += [f"## {comp}: `{ext_prefix}*` → `{sdup_prefix}*` ({_n(keys)})", "",
                f"| {official} | shape | sdup key (`{sdup_prefix}…`) | conversion |", "|---|---|---|---|"]
        for k in keys:
            _, sdup, sdup_shapes, op = mapped[k]
            conv = "" if op == COPY.name else f"{op} → " + "<br>".join(_shape(s) for s in sdup_shapes)
            names = "<br>".join(f"`{s[len(sdup_prefix):]}`" for s in sdup)
            out.append(f"| `{k[len(ext_prefix):]}` | {_shape(shapes[k])} | {names} | {conv} |")
        out.append("")
    if dropped:
        out += [f"## skipped on purpose ({_n(dropped)})", "", "| official key | shape | reason |", "|---|---|---|"]
        out += [f"| `{k}` | {_shape(shapes[k])} | {dropped[k]} |" for k in shapes if k in dropped]
        out.append("")
    return "\n".join(out)


def target(name: str) -> Path:
    return OUT / (name.removesuffix(".json") + ".md")


def stale() -> list[Path]:
    """Generated files that differ from (or are missing on) disk."""
    return [target(n) for n in sources() if not target(n).exists() or target(n).read_text() != render(n)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report stale files (exit status 1)")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale()
        for p in bad:
            print(f"stale: {p.relative_to(ROOT)} (run `{REGENERATE}`)")
        return int(bool(bad))
    OUT.mkdir(parents=True, exist_ok=True)
    for name in sources():
        target(name).write_text(render(name))
        print(target(name).relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
