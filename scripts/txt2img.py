#!/usr/bin/env python
"""Stable Diffusion text-to-image (SD 1.x / 2.x checkpoints, eps or v).

    python scripts/txt2img.py --weights weights/sd-v1-4.ckpt --prompt "a photograph of an astronaut riding a horse"
    python scripts/txt2img.py --weights sd-v1-4-diffusers/ --prompt "..." --sampler dpmpp_2m --steps 20 --batch 3 \\
        --out outputs/ --latents-out outputs/latents.safetensors      # latents for the x2 latent upscaler

Defaults follow the reference (CompVis scripts/txt2img.py): DDIM, 50 steps, guidance 7.5, eta 0, seed 42,
512x512. dpmpp_2m gives comparable images in ~20 steps. Sample i uses seed + i, so it is the same image whatever
the batch size. Each PNG carries its parameters (JSON, PNG text chunk "parameters"). Outputs are written to a
temporary name and renamed: an interrupted or failed run leaves no partial file, and the same command run again
resumes it from its last saved step (a hidden .NAME.sdup-state next to the first output; --no-resume starts over).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdup.diffusion.samplers import SAMPLER_NAMES  # noqa: E402  (light: no model code yet)
from sdup.cli.arguments import Parser, add_prompt_arguments, fail, parse_ids  # noqa: E402  (one-line errors, token ids: as the upscale CLI)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--weights", required=True,
                   help="checkpoint file (.ckpt / .safetensors) or diffusers folder; see weights/README.md")
    p.add_argument("--config", help="upstream YAML for non-standard checkpoints (e.g. configs/sd2-inference-v.yaml)")
    p.add_argument("--prediction", choices=["eps", "v"], help="override the detected parameterisation (SD 2.x 768-v: v)")
    add_prompt_arguments(p, required=True)
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--sampler", default="ddim", type=str.lower, choices=SAMPLER_NAMES,
                   help="ddim (default, the reference) | plms | ddpm | euler | euler_a | lms | dpmpp_2m (fast: ~20 steps)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (default 0) / Euler-a noise scale (default 1)")
    p.add_argument("--seed", type=int, default=42, help="seed of sample 0; sample i uses seed + i (default 42)")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=1, help="images to generate")
    p.add_argument("--out", default="outputs/txt2img",
                   help="PNG file (NAME.png; NAME-i.png for a batch) or folder (default outputs/txt2img)")
    p.add_argument("--bits", type=int, choices=[8, 16], default=8, help="PNG bit depth")
    p.add_argument("--latents-out", metavar="PATH.safetensors",
                   help="also save the scaled latents (B, 4, H/8, W/8) with the prompt and seeds (x2 upscaler input)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="UNet / text-encoder precision (the VAE: --vae-dtype)")
    p.add_argument("--vae-dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="VAE decode precision (default fp32; a non-finite half decode is redone in fp32)")
    p.add_argument("--memory-format", choices=["auto", "contiguous", "channels_last"], default="auto",
                   help="conv weight / activation layout (auto: channels_last for half precision on CUDA and on CPUs "
                        "with native bf16, else contiguous; sdup.optimize.choose_memory_format)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even when an interrupted run of the same output left its state")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="save the resume state every N steps (default: about once a minute of sampling; 0 = never)")
    return p


def check_args(args) -> None:
    """Everything that can be checked before loading gigabytes of weights."""
    for name in ("height", "width"):
        v = getattr(args, name)
        if v < 8 or v % 8:
            fail(f"--{name} must be a positive multiple of 8, got {v}")
    if args.steps < 1:
        fail(f"--steps must be >= 1, got {args.steps}")
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        fail(f"--checkpoint-every must be >= 0 (0 = never), got {args.checkpoint_every}")
    if args.batch < 1:
        fail(f"--batch must be >= 1, got {args.batch}")
    if args.latents_out and not args.latents_out.endswith(".safetensors"):
        fail(f"--latents-out must name a .safetensors file, got {args.latents_out}")
    if not Path(args.weights).exists():
        fail(f"{args.weights}: no such file or folder (download the weights as described in weights/README.md)")
    if args.config and not Path(args.config).is_file():
        fail(f"{args.config}: no such config file")


def resume_checkpoint(args, first, memory_format):
    """The resume state of this run, next to its first output (``sdup.pipelines.resume``)."""
    from sdup import images
    from sdup.fileio import fingerprint
    from sdup.pipelines.resume import Checkpoint, state_path
    depends = {"weights": fingerprint(args.weights), "config": fingerprint(args.config) if args.config else None,
               "memory format": memory_format}
    return Checkpoint(state_path(first), depends, every=args.checkpoint_every, resume=not args.no_resume,
                      label=str(first), note=images.note)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    prompt_ids, negative_ids = parse_ids(args.prompt_ids, "--prompt-ids"), parse_ids(args.negative_prompt_ids,
                                                                                      "--negative-prompt-ids")
    import torch
    import sdup
    from sdup.checkpoints import CheckpointError, KeyMismatch
    from sdup import images
    from sdup.diffusion.samplers import get_sampler
    from sdup.pipelines.latents_file import write_latents
    from sdup.pipelines.result import DTYPES
    from sdup.pipelines.seeds import sample_seeds
    from sdup.optimize import prepare
    from sdup.pipelines.job import run
    from sdup.pipelines.txt2img import prepare_txt2img

    try:
        get_sampler(args.sampler).resolve_eta(args.eta)  # before loading gigabytes
        sample_seeds(args.seed, args.batch)
        paths = images.output_paths(args.out, args.batch, names=[f"txt2img-{args.seed + i}" for i in range(args.batch)])
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:
            fail(f"--device {device}: not available ({str(e).splitlines()[0]})")
        dtype = DTYPES[args.dtype]
        model = sdup.load(args.weights, config=args.config, device=device, dtype=dtype, prediction=args.prediction)
        memory_format = prepare(model, args.memory_format)  # fused q/k/v, bf16 oneDNN Linears, layout (sdup.optimize)
        for path in {p.parent for p in paths} | ({Path(args.latents_out).parent} if args.latents_out else set()):
            path.mkdir(parents=True, exist_ok=True)
        checkpoint = resume_checkpoint(args, paths[0], memory_format)
        with torch.inference_mode():
            job = prepare_txt2img(model, prompt_ids if prompt_ids is not None else args.prompt,
                                  negative_ids if negative_ids is not None else args.negative_prompt,
                                  height=args.height, width=args.width, steps=args.steps, sampler=args.sampler,
                                  guidance=args.guidance, eta=args.eta, seed=args.seed, batch_size=args.batch,
                                  vae_dtype=DTYPES[args.vae_dtype], progress=not args.quiet)
            result = run(job, checkpoint=checkpoint)  # resumes an interrupted run of the same outputs
        result.parameters["memory_format"] = memory_format
        for i, path in enumerate(paths):
            images.save_png(result.images[i], path, result.sample_parameters(i), bits=args.bits)
            print(f"wrote {path}")
        if args.latents_out:
            write_latents(args.latents_out, result.latents, result.parameters, model.scale_factor)
            print(f"wrote {args.latents_out}")
        checkpoint.remove()
    except KeyMismatch as e:
        fail(e.one_line())
    except (CheckpointError, ValueError, OSError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        fail("interrupted (no output written)")
    return 0


if __name__ == "__main__":
    from sdup.fileio import sigterm_as_interrupt
    with sigterm_as_interrupt():  # SIGTERM cleans up like Ctrl-C: no temporary file left behind
        sys.exit(main())
