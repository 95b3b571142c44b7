#!/usr/bin/env python
"""Look inside the x4 upscaler: where each prompt token is attended, what the model believes x0 is along the way,
and what the noise level does to the result.

    python scripts/explore.py --weights x4-upscaler-ema.safetensors --image low.png --prompt "a white cat" -o out/
    python scripts/explore.py --weights tiny.ckpt --config tiny.yaml --image low.png --prompt-ids 254,7,9,255 -o out/

Writes into ``-o``:

* ``attention.png``: the input, then one heatmap per prompt token over it: the cross-attention probability that
  the image positions give the token, averaged over every sampling step, every UNet layer that reads the text
  (``attn2``; also ``attn1`` where ``disable_self_attentions`` makes it read the text, as in the x4 upscaler's
  first levels) and every head, on the conditional half of classifier-free guidance; each map is resized to the
  input and scaled to its own maximum (the label gives the token's mean probability).
  ``attention_maps.safetensors``: the same maps unscaled, (77, h, w), with the token ids.
* ``x0_steps.png``: the x0 predicted at the chosen steps (``--x0-steps``), decoded, left to right.
* ``noise_levels.png``: the outputs at each ``--noise-levels`` value (same seed), under them |output - bicubic
  input| (mean over channels, one colour scale for all levels), and a plot of its mean against the noise level.
* ``summary.json``: tokens, steps, levels and the plotted values.

How: ``sdup.nn.hooks.attention_hooks`` on the cross-attention layers (docs/research.md), the step callback of
``prepare_x4``'s ``Job`` (its ``x0_pred``), and one ``upscale_x4`` run per noise level.  Pictures are drawn with
Pillow only.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sdup  # noqa: E402
from sdup.nn.hooks import attention_hooks, attention_layers  # noqa: E402
from sdup.pipelines.job import finish, sample  # noqa: E402
from sdup.pipelines.x4 import prepare_x4, upscale_x4  # noqa: E402

PAD, LABEL_H, PLOT_H = 4, 14, 140   # px between cells, under each cell for its label, of the noise-level plot
STOPS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)  # inferno-ish


# ------------------------------------------------------------------------------------------------
# pictures (Pillow)


def to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB image."""
    arr = (x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def heat(values: np.ndarray) -> Image.Image:
    """(H, W) in [0, 1] -> RGB through the colour ramp ``STOPS``."""
    pos = np.clip(values, 0, 1) * (len(STOPS) - 1)
    lo = np.minimum(pos.astype(int), len(STOPS) - 2)
    frac = (pos - lo)[..., None]
    return Image.fromarray((STOPS[lo] * (1 - frac) + STOPS[lo + 1] * frac).round().astype(np.uint8))


def cell_size(h: int, w: int, longest: int) -> tuple[int, int]:
    """(width, height) of a cell showing an h x w picture with its longest side ``longest`` px."""
    s = longest / max(h, w)
    return max(1, round(w * s)), max(1, round(h * s))


def grid(cells: list[tuple[Image.Image, str]], cols: int, size: tuple[int, int]) -> Image.Image:
    """Labelled cells, ``cols`` per row, each resized to ``size`` (w, h) with its label under it."""
    cw, ch = size
    out = Image.new("RGB", grid_size(len(cells), cols, size), "white")
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    for i, (img, label) in enumerate(cells):
        x, y = PAD + (i % cols) * (cw + PAD), PAD + (i // cols) * (ch + LABEL_H + PAD)
        out.paste(img.resize((cw, ch), Image.BILINEAR), (x, y))
        draw.text((x, y + ch + 1), label, fill="black", font=font)
    return out


def grid_size(n: int, cols: int, size: tuple[int, int]) -> tuple[int, int]:
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    return cols * (size[0] + PAD) + PAD, rows * (size[1] + LABEL_H + PAD) + PAD


def line_plot(xs, ys, width: int, height: int, xlabel: str, ylabel: str) -> Image.Image:
    """A small line plot with dots; the y axis spans the values (its ends written on it), x the given xs."""
    out = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    left, right, top, bottom = 56, width - 12, 18, height - 28
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    span = (max(ys) - min(ys)) or abs(max(ys)) or 1.0
    y0, y1 = min(ys) - 0.1 * span, max(ys) + 0.1 * span
    pts = [(left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))
           for x, y in zip(xs, ys)]
    if len(pts) > 1:
        draw.line(pts, fill=(188, 55, 84), width=2)
    for (px, py), x in zip(pts, xs):
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(87, 16, 110))
        draw.text((px - 6, bottom + 3), f"{x:g}", fill="black", font=font)
    draw.text((2, top - 2), f"{y1:.4g}", fill="black", font=font)
    draw.text((2, bottom - 10), f"{y0:.4g}", fill="black", font=font)
    draw.text((left + 4, 2), ylabel, fill="black", font=font)
    draw.text((right - 6 * len(xlabel), bottom + 15), xlabel, fill="black", font=font)
    return out


# ------------------------------------------------------------------------------------------------
# what the model does


class CrossAttentionMaps:
    """An attention hook that sums, per text token, the probability every image position gives it, resized to the
    latent (h, w), over calls; ``batch``: samples per call (the conditional half of a CFG batch is the last)."""

    def __init__(self, height: int, width: int, batch: int = 1):
        self.size, self.batch = (height, width), batch
        self.total, self.calls = None, 0

    def __call__(self, name, q, k, v, probs):
        p = probs[-self.batch:].mean(1)                                    # (B, Nq, Nk): cond half, mean of heads
        scale = round(math.sqrt(self.size[0] * self.size[1] / p.shape[1]))  # latent px per query token
        h, w = self.size[0] // scale, self.size[1] // scale
        maps = p.transpose(1, 2).reshape(p.shape[0], p.shape[2], h, w)  # (B, Nk, h_l, w_l)
        maps = F.interpolate(maps.detach().float(), size=self.size, mode="bilinear", align_corners=False)
        self.total = maps if self.total is None else self.total + maps
        self.calls += 1

    def mean(self) -> torch.Tensor:
        """(B, Nk, h, w): the average over every call so far."""
        return self.total.cpu() / max(1, self.calls)


def text_layers(model) -> list[str]:
    """The UNet's attention layers that read the text (their keys come from the context)."""
    layers = attention_layers(model).items()
    return [n for n, m in layers if n.startswith("unet.") and not getattr(m, "fusable_qkv", True)]


def prompt_tokens(model, args) -> tuple[list[int], list[str]]:
    """(token ids with start / end, a label per id) of ``--prompt`` or ``--prompt-ids``."""
    if args.prompt_ids:
        ids = [int(t) for t in args.prompt_ids.split(",")]
    elif model.tokenizer is not None:
        row = model.tokenizer([args.prompt])[0].tolist()
        ids = row[: row.index(model.tokenizer.eos_token_id) + 1]
    else:
        raise SystemExit("error: this text encoder has no BPE tokenizer: give --prompt-ids")
    bpe = getattr(model.tokenizer, "bpe", None)
    labels = [bpe.decode([i]).strip() if bpe is not None else f"#{i}" for i in ids]
    return ids, labels


def pick_steps(steps: int, spec: str | None, count: int = 5) -> list[int]:
    if spec:
        return sorted({int(s) for s in spec.split(",") if 0 <= int(s) < steps})
    return sorted({round(i * (steps - 1) / max(1, count - 1)) for i in range(count)})


def run_main(model, image: torch.Tensor, ids: list[int], args) -> dict:
    """One x4 run with the attention maps and the x0 predictions recorded -> dict(maps, x0 [(step, t, image)])."""
    keep, x0s = set(pick_steps(args.steps, args.x0_steps)), []
    job = prepare_x4(model, image, [ids], noise_level=args.noise_level, steps=args.steps, guidance=args.guidance,
                     seed=args.seed, sampler=args.sampler, progress=False)
    job.callback = lambda d: x0s.append((d["i"], int(d["t"]), d["x0_pred"].clone())) if d["i"] in keep else None
    maps = CrossAttentionMaps(*job.x_T.shape[-2:])
    with torch.inference_mode(), attention_hooks(model, {name: maps for name in text_layers(model)}):
        finish(job, sample(job))
    with torch.inference_mode():
        x0 = [(i, t, ((job.decode(z.float()) + 1) / 2).clamp(0, 1)[0]) for i, t, z in x0s]
    h, w = image.shape[-2:]
    return dict(maps=maps.mean()[0, :, :h, :w], x0=x0)


def noise_sweep(model, image: torch.Tensor, ids: list[int], args) -> list[torch.Tensor]:
    out = []
    for level in args.levels:
        res = upscale_x4(model, image, [ids], noise_level=level, steps=args.steps, guidance=args.guidance,
                         seed=args.seed, sampler=args.sampler, progress=False)
        out.append(res.images[0].cpu())
    return out


# ------------------------------------------------------------------------------------------------
# the three pictures


def attention_picture(image: torch.Tensor, maps: torch.Tensor, ids: list[int], labels: list[str], args):
    """The input, then per prompt token (between start and end) its map over the input."""
    base = to_pil(image)
    size = cell_size(*image.shape[-2:], args.cell)
    cells = [(base, "input")]
    for pos in range(1, len(ids) - 1) if len(ids) > 2 else range(len(ids)):
        m = maps[pos].numpy()
        overlay = Image.blend(base.resize(size, Image.BICUBIC),
                              heat(m / max(float(m.max()), 1e-12)).resize(size, Image.BILINEAR), 0.6)
        cells.append((overlay, f"{labels[pos]}  p={float(m.mean()):.3f}"))
    return grid(cells, args.cols, size)


def x0_picture(x0: list, args) -> Image.Image:
    size = cell_size(*x0[0][2].shape[-2:], args.cell)
    return grid([(to_pil(img), f"step {i} t={t}") for i, t, img in x0], len(x0), size)


def noise_picture(image: torch.Tensor, outs: list[torch.Tensor], levels: list[int], args):
    """Outputs (row 1), |output - bicubic input| on one colour scale (row 2), then the plot of its mean."""
    ref = F.interpolate(image[None].float(), size=outs[0].shape[-2:], mode="bicubic", align_corners=False)[0]
    diffs = [(o.float() - ref).abs().mean(0).numpy() for o in outs]
    top = max(float(d.max()) for d in diffs) or 1.0
    size = cell_size(*outs[0].shape[-2:], args.cell)
    cells = [(to_pil(o), f"noise {lv}") for o, lv in zip(outs, levels)]
    cells += [(heat(d / top), f"|d| {float(d.mean()):.3f}") for d in diffs]
    top_part = grid(cells, len(levels), size)
    means = [float(d.mean()) for d in diffs]
    plot = line_plot(levels, means, top_part.width, PLOT_H, "noise level", "mean |output - bicubic input|")
    out = Image.new("RGB", (top_part.width, top_part.height + PLOT_H), "white")
    out.paste(top_part, (0, 0))
    out.paste(plot, (0, top_part.height))
    return out, means


# ------------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="scripts/explore.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="an x4 upscaler checkpoint (file or diffusers folder)")
    p.add_argument("--config", help="upstream YAML for non-standard sizes (the tiny test weights)")
    p.add_argument("--image", required=True, help="the low-res input (PNG, JPEG, ...)")
    p.add_argument("--prompt", default="", help="the prompt (needs the CLIP tokenizer of the real weights)")
    p.add_argument("--prompt-ids", help="the prompt as token ids with start / end, e.g. 254,7,9,255")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--guidance", type=float, default=9.0)
    p.add_argument("--noise-level", type=int, default=20, help="of the attention and x0 run")
    p.add_argument("--noise-levels", default="0,20,50,100,200,350", help="compared in noise_levels.png")
    p.add_argument("--x0-steps", help="step indices for x0_steps.png (default: 5 spread over the run)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cell", type=int, default=256, help="longest side of each picture cell, px")
    p.add_argument("--cols", type=int, default=6, help="cells per row of attention.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = p.parse_args(argv)
    args.levels = [int(v) for v in args.noise_levels.split(",")]
    return args


def load_image(path) -> torch.Tensor:
    """(3, H, W) in [0, 1]."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = sdup.load(args.weights, config=args.config, device=args.device, dtype=getattr(torch, args.dtype))
    image = load_image(args.image)
    ids, labels = prompt_tokens(model, args)
    run = run_main(model, image, ids, args)
    attention_picture(image, run["maps"], ids, labels, args).save(out / "attention.png")
    maps = {"maps": run["maps"].contiguous(), "token_ids": torch.tensor(ids)}
    save_file(maps, str(out / "attention_maps.safetensors"))
    x0_picture(run["x0"], args).save(out / "x0_steps.png")
    picture, means = noise_picture(image, noise_sweep(model, image, ids, args), args.levels, args)
    picture.save(out / "noise_levels.png")
    summary = dict(tokens=labels, token_ids=ids, x0_steps=[i for i, _, _ in run["x0"]], noise_levels=args.levels,
                   mean_abs_diff=means, layers=text_layers(model), steps=args.steps, seed=args.seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out}/attention.png, x0_steps.png, noise_levels.png, attention_maps.safetensors, summary.json")
    return summary


if __name__ == "__main__":
    main()
