"""The upscale command's arguments (``scripts/upscale.py`` = ``python -m sdup upscale``) and the checks that need
no weights.  Every mistake ends in one line ``error: ...`` on stderr and exit code 2 (``fail``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..diffusion.samplers import SAMPLER_NAMES
from ..pipelines.registry import UPSCALERS
from ..images import MAX_PIXELS, one_line
from ..tiling.plan import TileDefaults

UPSCALE_DOC = """Upscale images with the Stable Diffusion upscalers (``scripts/upscale.py`` = ``python -m sdup upscale``).

    python scripts/upscale.py photos/ -o upscaled/ --weights weights/x4-upscaler-ema.safetensors
    python scripts/upscale.py "scans/*.png" -o out/ --weights weights/x4-upscaler-ema.safetensors \\
        --prompt "a sharp photograph" --steps 50 --noise-level 20 --color-fix wavelet
    python scripts/upscale.py big.png --model x4 --dry-run       # tile plan + memory estimate, no weights needed

    python scripts/upscale.py lat.safetensors -o big.png --model x2 --weights sd-x2-latent-upscaler/ --prompt "..."
    python scripts/upscale.py faces/ -o sr/ --weights stablesr_000117.ckpt --vae vqgan_cfw_00011.ckpt --dec-w 0.5

Inputs: image files, folders (png/jpg/jpeg/webp/tif/tiff/bmp, not recursive) and globs; for --model x2 also latents
files of scripts/txt2img.py --latents-out (.safetensors, given by name; one output per sample in the file). Outputs: -o NAME.ext for
one input, else a folder (default outputs/upscale) with <stem>_x<scale>.<ext>; --format png|jpg|webp|tiff
(default: the input's format; PNG for BMP). 16-bit PNG/TIFF inputs give 16-bit outputs, alpha is upscaled
separately (bicubic) and re-attached, EXIF orientation is applied. The parameters are stored in the output
(PNG text chunk "parameters"; TIFF/JPEG/WebP ImageDescription). Every output is written to a temporary name and
renamed: an interrupted run leaves no partial file, and the same command run again resumes it from its last saved
step (.OUTPUT.sdup-state next to the output; --no-resume starts over). An output sdup wrote is replaced
(--skip-existing: not when made from the same, unchanged input); any other file at an output name is kept unless
--overwrite. Outputs of sdup in an input folder are left out. Concurrent runs over one folder share the work (each
output is claimed).
One image at a time (host memory stays bounded). Mistakes end in one line "error: ..." and exit code 2.
"""
MODELS = ("auto", *UPSCALERS)
DEFAULT_OUTPUT = "outputs/upscale"
DEFAULT_TILES = TileDefaults()  # the help's numbers (each upscaler has its own: ``Upscaler.tiles``)
MIN_SIDE = 8  # the smallest tile and input side


class UsageError(SystemExit):
    """A user mistake: exit code 2 for the command line, and ``message`` (one line) for a caller that shows it
    elsewhere (the web page, ``sdup.web``)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse would also print the usage)
        fail(message)


def fail(msg: str):
    """``error: MSG`` on stderr as one line (names with newlines or odd bytes escaped: ``one_line``); raises
    ``UsageError``: exit code 2, and the line for a caller that shows it elsewhere (the web page)."""
    msg = one_line(msg)
    print(f"error: {msg}", file=sys.stderr)
    raise UsageError(msg)


def say(line: str) -> None:
    """A line of the command's own output on stdout (``wrote ...``, ``skip ...``), names escaped (``one_line``)."""
    print(one_line(line))


def add_upscale_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders or globs (quote globs)")
    p.add_argument("--rerun", metavar="OUTPUT",
                   help="run again what made OUTPUT (an image sdup wrote): the command recorded in it, on the input "
                        "recorded in it, with the same weights (checked by their sha256), writing to -o")
    p.add_argument("-o", "--output", default=None,
                   help=f"output file (one input: NAME.png/.jpg/.webp/.tif) or folder (default {DEFAULT_OUTPUT})")
    p.add_argument("--format", choices=["png", "jpg", "webp", "tiff"], default=None,
                   help="output format (default: same as the input; PNG for formats that cannot be written)")
    p.add_argument("--model", choices=MODELS, default="auto", help="which upscaler (default: from the checkpoint)")
    p.add_argument("--weights", help="checkpoint file or diffusers folder (see weights/README.md)")
    _model_arguments(p)
    p.add_argument("--config", help="upstream YAML for non-standard checkpoints (official ones: configs/)")
    add_prompt_arguments(p, required=False)
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps (default: x4 75, x2 75, stablesr 200 with ddpm / 50 with ddim; turbo: 4)")
    p.add_argument("--sampler", default=None, type=str.lower, choices=SAMPLER_NAMES,
                   help="default: the reference's (x4 ddim; x2 euler, which takes only euler / euler_a / lms / dpmpp_2m; "
                        "stablesr ddpm, or ddim with a negative prompt)")
    p.add_argument("--schedule", default=None, choices=["diffusers", "original", "karras"],
                   help="x2: sigma grid (default diffusers; original = the k-diffusion notebook's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default x4 9, x2 9, stablesr 1 with ddpm / 7 with ddim; 1 = off)")
    p.add_argument("--noise-level", type=float, default=None,
                   help="x4: low-res noise augmentation, an integer 0..350 (default 20; more = more invented detail); "
                        "x2: the original model's noise level >= 0 (default 0; > 0 needs the k-diffusion file)")
    p.add_argument("--seed", type=int, default=42, help="seed (each image uses this seed; default 42)")
    p.add_argument("--tile", type=int, default=None,
                   help=f"latent tile size for tiled diffusion (default: on above {DEFAULT_TILES.tile}; 0 = off)")
    p.add_argument("--tile-overlap", type=int, default=None, help=f"latent tile overlap (default {DEFAULT_TILES.overlap})")
    p.add_argument("--vae-tile", type=int, default=None,
                   help=f"latent tile size of the tiled VAE decode (default: on above {DEFAULT_TILES.vae_tile}; 0 = off)")
    p.add_argument("--color-fix", choices=["none", "adain", "wavelet"], default=None,
                   help="match the output's colours to the input (default: none; stablesr wavelet)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="UNet / text-encoder precision (the VAE: --vae-dtype)")
    p.add_argument("--vae-dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="VAE decode precision for x4 / x2 (default fp32; a non-finite half decode is redone in fp32; "
                        "tiled decodes and StableSR's CFW decoder always run in fp32)")
    p.add_argument("--memory-format", choices=["auto", "contiguous", "channels_last"], default="auto",
                   help="conv weight / activation layout (auto: channels_last for half precision on CUDA and on CPUs "
                        "with native bf16, else contiguous; sdup.optimize.choose_memory_format)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps ... (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="wrap the UNet in torch.compile")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"refuse input images above N pixels before decoding them (default {MAX_PIXELS:,}; 0 = no limit)")
    _output_arguments(p)
    p.add_argument("--dry-run", action="store_true",
                   help="print output sizes, the tile plan and a peak-memory estimate; needs no weights, writes nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _output_arguments(p: argparse.ArgumentParser) -> None:
    """What happens to existing outputs, and to the state of an interrupted run."""
    p.add_argument("--skip-existing", action="store_true",
                   help="skip inputs whose output sdup already made from this very input (recorded in the output: "
                        "its path and sha256); an output another run is writing is always left to it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing files at the output names that sdup did not write under that name (without "
                        "it such a file is kept and the run refused before any work)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over even when an interrupted run of the same output left its state "
                        "(.OUTPUT.sdup-state)")
    p.add_argument("--checkpoint-every", type=_step_count, default=None, metavar="N",
                   help="save the resume state every N steps (default: about once a minute of sampling; 0 = never)")


def _step_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of steps >= 0, got {text!r}")
    return n


def add_prompt_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    """--prompt | --prompt-ids and --negative-prompt | --negative-prompt-ids (this CLI and scripts/txt2img.py)."""
    text = p.add_mutually_exclusive_group(required=required)
    text.add_argument("--prompt", default=None if required else "",
                      help="the text prompt" if required else 'text describing the image (default "")')
    text.add_argument("--prompt-ids", metavar="IDS",
                      help="the prompt as comma-separated token ids, start/end tokens included (encoders without a "
                           "BPE tokenizer, e.g. the tiny test fixtures: 254,10,20,255)")
    neg = p.add_mutually_exclusive_group()
    neg.add_argument("--negative-prompt", default="", help='unconditional text for guidance (default "")')
    neg.add_argument("--negative-prompt-ids", metavar="IDS", help="the negative prompt as token ids")


def _model_arguments(p: argparse.ArgumentParser) -> None:
    """The options of one upscaler only (--vae: x2 and StableSR; the rest StableSR)."""
    p.add_argument("--vae", metavar="PATH",
                   help="x2: the SD 1.x / 2.x checkpoint or VAE (e.g. the sd-vae-ft-mse folder) that encodes images / "
                        "decodes latents; needed for the original k-diffusion file, which has neither VAE nor text "
                        "encoder (an SD 1.x checkpoint also supplies its CLIP ViT-L/14); default: the checkpoint's own. "
                        "stablesr: the CFW autoencoder vqgan_cfw_00011.ckpt (without it: the plain SD VAE, no fusion)")
    p.add_argument("--dec-w", type=float, default=None,
                   help="stablesr: CFW fidelity weight 0..1 (default 0.5; 1 = closest to the input, 0 = most generated)")
    p.add_argument("--scale", type=float, default=None, help="stablesr: upscaling factor (default 4; any value 1..16)")
    p.add_argument("--input-size", type=int, default=None,
                   help="stablesr: the model's native size (default 512; 768 for the 768-v model): smaller inputs are "
                        "upsampled to it and resized down at the end (the reference's --input_size)")
    p.add_argument("--start", choices=["lr", "noise"], default=None,
                   help="stablesr: start from the noised LR latent (default, the reference) or from pure noise")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = Parser(prog=prog, description=UPSCALE_DOC.splitlines()[0], epilog="\n".join(UPSCALE_DOC.splitlines()[1:]),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_upscale_arguments(p)


def parse_ids(text: str | None, what: str):
    if text is None:
        return None
    try:
        ids = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        fail(f"{what}: expected comma-separated integers, got {text!r}")
    if not ids:
        fail(f"{what}: no token ids given")
    return ids


def check_args(args) -> None:
    """The file and tiling arguments, before touching the weights (the pipeline options: ``planning.settings``)."""
    for name in ("tile", "vae_tile"):
        v = getattr(args, name)
        if v is not None and v != 0 and v < MIN_SIDE:
            fail(f"--{name.replace('_', '-')} must be 0 (off) or >= {MIN_SIDE}, got {v}")
    if args.tile_overlap is not None:
        tile = args.tile or DEFAULT_TILES.tile
        if args.tile_overlap < 0 or args.tile_overlap >= tile:
            fail(f"--tile-overlap must be in 0..{tile - 1} (less than the tile), got {args.tile_overlap}")
    if args.max_pixels < 0:
        fail(f"--max-pixels must be >= 0 (0 = no limit), got {args.max_pixels}")
    if not 0 <= args.seed < 2 ** 63:
        fail(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.config and not Path(args.config).is_file():
        fail(f"{args.config}: no such config file")
    if args.vae and not Path(args.vae).exists():
        fail(f"--vae {args.vae}: no such file or folder (an SD 1.x / 2.x checkpoint or VAE, see weights/README.md)")


def flag_message(e: ValueError) -> str:
    """A pipeline's message about one of its options, named as the command-line flag ("noise_level must ..." ->
    "--noise-level must ...")."""
    msg = str(e).splitlines()[0]
    name = msg.split(" ", 1)[0]
    flag = "--" + name.replace("_", "-")
    return flag + msg[len(name):] if any(a.dest == name for a in build_parser()._actions) else msg
