"""Upscale images with the Stable Diffusion upscalers (``scripts/upscale.py`` = ``python -m sdup upscale``).

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
renamed: an interrupted run leaves no partial file. Existing outputs are replaced unless --skip-existing.
One image at a time (host memory stays bounded). Mistakes end in one line "error: ..." and exit code 2.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .fileio import Terminated, can_create, sigterm_as_interrupt

UPSCALE_DOC = __doc__
MODELS = ("auto", "x4", "x2", "stablesr")
SCALES = {"x4": 4, "x2": 2, "stablesr": 4}
IMPLEMENTED = ("x4", "x2", "stablesr")
CONFIGS = {"x4": "x4-upscaling.yaml"}  # official YAMLs in configs/ for the weight-less --dry-run
LATENT_EXTENSIONS = (".safetensors",)  # x2 inputs: latents files of scripts/txt2img.py --latents-out
EXPECTED_FILES = {
    "x4": "x4-upscaler-ema.safetensors or x4-upscaler-ema.ckpt (stabilityai/stable-diffusion-x4-upscaler), "
          "or that repo's diffusers folder",
    "x2": "the stabilityai/sd-x2-latent-upscaler diffusers folder, or "
          "laion_text_cond_latent_upscaler_2_1_00470000_slim.pth",
    "stablesr": "stablesr_000117.ckpt (or stablesr_768v_000139.ckpt) + vqgan_cfw_00011.ckpt (Iceclear/StableSR)",
}
DEFAULT_OUTPUT = "outputs/upscale"
# tiling defaults (latent pixels; x4: latent = low-res image pixels). Above these sizes tiling switches on.
DEFAULT_TILE, DEFAULT_TILE_OVERLAP, DEFAULT_VAE_TILE, DEFAULT_VAE_OVERLAP = 128, 32, 128, 8
STABLESR_TILE = 64
MIN_SIDE = 8


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse would also print the usage)
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def add_upscale_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .pipelines.common import SAMPLER_NAMES
    from .pipelines.upscale_io import MAX_PIXELS
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
                   help=f"latent tile size for tiled diffusion (default: on above {DEFAULT_TILE}; 0 = off)")
    p.add_argument("--tile-overlap", type=int, default=None, help=f"latent tile overlap (default {DEFAULT_TILE_OVERLAP})")
    p.add_argument("--vae-tile", type=int, default=None,
                   help=f"latent tile size of the tiled VAE decode (default: on above {DEFAULT_VAE_TILE}; 0 = off)")
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
    p.add_argument("--skip-existing", action="store_true",
                   help="skip inputs whose output file already exists (an empty file does not count)")
    p.add_argument("--dry-run", action="store_true",
                   help="print output sizes, the tile plan and a peak-memory estimate; needs no weights, writes nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


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


# ------------------------------------------------------------------------------------------------
# checks


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
    """The file and tiling arguments, before touching the weights (the pipeline options: ``_settings``)."""
    for name in ("tile", "vae_tile"):
        v = getattr(args, name)
        if v is not None and v != 0 and v < MIN_SIDE:
            fail(f"--{name.replace('_', '-')} must be 0 (off) or >= {MIN_SIDE}, got {v}")
    if args.tile_overlap is not None:
        tile = args.tile or DEFAULT_TILE
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


def missing_weights(model: str, given: str | None) -> str:
    which = model if model != "auto" else "x4"
    where = f"{given}: no such file or folder" if given else "no weights given (--weights)"
    return (f"{where}; the {which} upscaler needs {EXPECTED_FILES[which]} -- download it as described in "
            f"weights/README.md and pass --weights PATH")


def detect_family(args) -> str:
    """The checkpoint's family (header only), checked against --model."""
    from .checkpoints.detect import FAMILY_NAMES
    from .checkpoints.loader import inspect
    det, _, error = inspect(Path(args.weights), config=args.config)
    family = det.family
    if family == "unknown":
        fail(f"{args.weights}: not a supported checkpoint ({error or 'unknown layout'})")
    if args.model != "auto" and args.model != family:
        fail(f"--model {args.model} does not match the checkpoint: {args.weights} is a {family} checkpoint "
             f"({FAMILY_NAMES.get(family, family)})")
    if family not in SCALES:
        fail(f"{args.weights} is a {family} checkpoint ({FAMILY_NAMES.get(family, family)}), not an upscaler "
             f"(x4, x2 or stablesr)")
    return family


def not_implemented(family: str):
    fail(f"the {family} upscaler pipeline is not implemented yet (only {' and '.join(IMPLEMENTED)} are); use --model "
         f"x4 with the stable-diffusion-x4-upscaler weights")


def repo_configs() -> Path:
    return Path(__file__).resolve().parents[1] / "configs"


def meta_model_from_config(family: str, config: str | None):
    """A LoadedModel on the meta device: x4 from an upstream YAML (``--config`` or the official one in configs/),
    x2 from the official K-UNet / CLIP ViT-L/14 / SD VAE configurations."""
    import torch
    from .checkpoints.loader import FAMILY_DEFAULTS, LoadedModel, _ldm_constants, _yaml_params
    from .models import text as T
    from .models.unet import UNet, UNetConfig
    from .models.vae import AutoencoderKL, VAEConfig
    if family == "x2":
        from .models.latent_upscaler import KUNet, KUNetConfig
        out = LoadedModel(family="x2", source="official sd-x2-latent-upscaler configuration",
                          prediction=FAMILY_DEFAULTS["x2"]["prediction"])
        with torch.device("meta"):
            out.unet, out.vae = KUNet(KUNetConfig()), AutoencoderKL(VAEConfig())
            out.text_encoder = T.TextEncoder(T.KNOWN_TEXT_CONFIGS["openai/clip-vit-large-patch14"])
        out.configs = {"unet": out.unet.cfg, "vae": out.vae.cfg}
        return out
    path = Path(config) if config else repo_configs() / CONFIGS[family]
    if not path.is_file():
        fail(f"{path}: the official {family} config is missing (pass --config)")
    yaml = _yaml_params(path)
    params = yaml.get("params", {})
    out = LoadedModel(family=family, source=str(path))
    out.prediction = params.get("parameterization", FAMILY_DEFAULTS[family]["prediction"])
    _ldm_constants(out, params)
    with torch.device("meta"):
        out.unet = UNet(UNetConfig.from_ldm(params["unet_config"]["params"]))
        out.vae = AutoencoderKL(VAEConfig.from_ldm(params["first_stage_config"]["params"]))
        cond = (params.get("cond_stage_config") or {}).get("params", {}) or {}
        tcfg = T.KNOWN_TEXT_CONFIGS.get(cond.get("version") or cond.get("arch") or "")
        if tcfg is not None:
            out.text_encoder = T.TextEncoder(tcfg)
    out.configs = {"unet": out.unet.cfg, "vae": out.vae.cfg}
    if out.text_encoder is not None:
        out.configs["text_encoder"] = out.text_encoder.cfg
    return out


def _vae_factor(vae) -> int:
    cfg = getattr(vae, "cfg", None)
    return cfg.downscale if cfg is not None else 8


def min_side(model, family: str) -> int:
    """Smallest input side accepted (pixels), never below 8.
    x4: the UNet's downsampling factor 2**(levels-1) (8 for the real model): the x4 latent has the input's size and
    a smaller input would be mostly padding with a sub-pixel bottleneck (x4.py pads up to the multiple).
    x2: twice the VAE factor times the K-UNet's latent multiple (2 x 8 x 4 = 64 px for the real model): below that
    the K-UNet's bottom level is 1 px wide (its reflect padding needs 2)."""
    if family == "x2":
        from .pipelines.x2_latent import latent_multiple
        return max(MIN_SIDE, 2 * _vae_factor(model.vae) * latent_multiple(model.unet))
    if family == "stablesr":  # upsampled to >= 512 px anyway; 8 px is the least the bicubic upsampling keeps sane
        return MIN_SIDE
    from .pipelines.x4 import unet_multiple
    return max(MIN_SIDE, unet_multiple(model))


def latent_size(model, family: str, size: tuple[int, int], latent: tuple[int, int] | None = None,
                scale: float = 4.0, input_size: int | None = None) -> tuple[int, int]:
    """The latent the diffusion runs on for a low-res input of ``size`` (H, W) pixels: x4 the input's size; x2 the
    2x SD latent (2H/8 x 2W/8, or twice the given low-res ``latent`` of a latents file)."""
    if latent is not None:
        return 2 * latent[0], 2 * latent[1]
    if family == "stablesr":  # upsampled by s, padded to 32, f = 8 (see pipelines/stablesr.py)
        from .pipelines.stablesr import upsampled_size
        H, W = upsampled_size(model, size, scale, input_size)
        return -(-H // 32) * 4, -(-W // 32) * 4
    if family == "x2":
        f = _vae_factor(model.vae)
        return 2 * -(-size[0] // f), 2 * -(-size[1] // f)
    return size


# ------------------------------------------------------------------------------------------------
# inputs: images, and latents files for x2


@dataclass
class Item:
    path: Path                 # the input file
    size: tuple[int, int]      # low-res size in pixels (H, W); latents: 8 x the latent size
    name: Path                 # what the output is named after
    index: int | None = None   # latents file: the sample in it
    latent: tuple[int, int] | None = None  # latents file: the low-res latent size (h, w)


@lru_cache(maxsize=1)
def latents_file(path: Path):
    """``x2_latent.read_latents``, read once per file although every sample of it is a separate output."""
    from .pipelines.x2_latent import read_latents
    return read_latents(path)


def is_latents(path: Path) -> bool:
    return path.suffix.lower() in LATENT_EXTENSIONS


def latents_shape(path: Path) -> tuple[int, ...]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            if "latents" not in f.keys():
                fail(f"{path}: no 'latents' tensor (expected a file from scripts/txt2img.py --latents-out)")
            return tuple(f.get_slice("latents").get_shape())
    except Exception as e:  # noqa: BLE001 -- OSError, or safetensors' own SafetensorError for a bad header
        fail(f"{path}: not a readable latents file ({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def plan_items(inputs: list[Path], family: str | None, max_pixels: int | None = None,
               decode: bool = False) -> list[Item]:
    """Pass over every input before any work: readable, and latents only for x2. From the headers alone (the dry
    run), or with ``decode`` each image decoded once and dropped, so a corrupt one fails before the first output."""
    from .pipelines import upscale_io as io
    items = []
    for path in inputs:
        if is_latents(path):
            if family not in (None, "x2"):
                fail(f"{path}: a latents file; only --model x2 (the latent upscaler) takes latents, the {family} "
                     f"upscaler takes images")
            shape = latents_shape(path)
            if len(shape) != 4 or shape[1] != 4:
                fail(f"{path}: latents of shape {shape}, the x2 latent upscaler needs SD 1.x / 2.x latents "
                     f"(B, 4, h, w)")
            for i in range(shape[0]):
                name = path.with_suffix(".png") if shape[0] == 1 else path.with_name(f"{path.stem}-{i}.png")
                items.append(Item(path, (8 * shape[2], 8 * shape[3]), name, i, (shape[2], shape[3])))
        else:
            try:
                items.append(Item(path, io.image_size(path, max_pixels), path))
                if decode:
                    io.read_image(path, max_pixels)
            except io.UpscaleIOError as e:
                fail(str(e))
    return items


# ------------------------------------------------------------------------------------------------
# tile plan and memory estimate (rough)


def tiles_1d(n: int, tile: int, overlap: int) -> int:
    """Tiles along one axis, with the grid of ``tiling.tile_grid`` (StableSR's canvas)."""
    if tile <= 0 or n <= tile:
        return 1
    from .tiling import tile_grid
    return len(tile_grid(n, tile, overlap))


def tile_settings(args, latent_hw: tuple[int, int], family: str = "x4") -> dict:
    """Effective tile sizes for a diffusion latent of ``latent_hw`` (None = untiled). StableSR tiles like its
    reference: 64-px latent tiles (the 512 model's native size) with overlap 32; its VAE tiles (the CFW decoder, the
    encoder features cut to each tile) like the others'."""
    h, w = latent_hw
    default = STABLESR_TILE if family == "stablesr" else DEFAULT_TILE
    tile = args.tile if args.tile is not None else (default if max(h, w) > default else 0)
    tile -= tile % MIN_SIDE  # a multiple of the UNet's factor (8 for the real x4 model and the x2 K-UNet)
    vae = args.vae_tile if args.vae_tile is not None else (DEFAULT_VAE_TILE if max(h, w) > DEFAULT_VAE_TILE else 0)
    share = 2 if family == "stablesr" else 4  # StableSR: 64 / 32; x4 / x2: 128 / 32
    overlap = args.tile_overlap if args.tile_overlap is not None else min(DEFAULT_TILE_OVERLAP, max(tile // share, 0))
    vae_overlap = min(DEFAULT_VAE_OVERLAP, max(vae // 4, 0))
    return dict(tile=tile or None, overlap=overlap if tile else 0, vae_tile=vae or None, vae_overlap=vae_overlap,
                latent_tiles=tiles_1d(h, tile, overlap) * tiles_1d(w, tile, overlap),
                vae_tiles=tiles_1d(h, vae, vae_overlap) * tiles_1d(w, vae, vae_overlap))


def _bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def _ldm_unet_bytes(ucfg, th: int, tw: int, batch: int, b: int) -> int:
    """LDM UNet: batch x sum over levels of channels x tile pixels x 8 live tensors, plus the attention scores of
    the self-attention levels (heads x N^2, as if materialised)."""
    total = 0
    dis = list(ucfg.disable_self_attentions or [False] * len(ucfg.channel_mult))
    for lvl, mult in enumerate(ucfg.channel_mult):
        ds = 2 ** lvl
        n = math.ceil(th / ds) * math.ceil(tw / ds)
        total += batch * ucfg.model_channels * mult * n * b * 8
        if ds in tuple(ucfg.attention_resolutions) and not dis[lvl]:
            total += batch * ucfg.heads_for(ucfg.model_channels * mult)[0] * n * n * b
    ds = 2 ** (len(ucfg.channel_mult) - 1)
    n_mid = math.ceil(th / ds) * math.ceil(tw / ds)
    if not ucfg.disable_middle_self_attn:
        total += batch * ucfg.heads_for(ucfg.model_channels * ucfg.channel_mult[-1])[0] * n_mid * n_mid * b
    return total


def _kunet_bytes(kcfg, th: int, tw: int, batch: int, b: int) -> int:
    """x2 K-UNet: the same rule (8 live tensors per level, self-attention scores where the level has it)."""
    total = 0
    for lvl, (ch, sa) in enumerate(zip(kcfg.channels, kcfg.self_attn_depths)):
        n = math.ceil(th / 2 ** lvl) * math.ceil(tw / 2 ** lvl)
        total += batch * ch * n * b * 8 + (batch * kcfg.heads(ch) * n * n * b if sa else 0)
    return total


def estimate_peak_bytes(model, latent_hw, plan: dict, dtype: str, guidance: float) -> int:
    """Rough peak memory of one image: weights + the larger of one UNet call (``_ldm_unet_bytes`` /
    ``_kunet_bytes`` on one tile) and one VAE decode: the decoder's top level (ch x ch_mult[0] channels at the output
    resolution) x 4 live fp32 tensors plus its mid-block attention (N^2 scores) untiled,
    ``tiling.estimate_vae_bytes`` when tiled. Not a measurement: expect +-50 %."""
    ucfg, vcfg = model.unet.cfg, model.vae.cfg
    b = _bytes(dtype)
    weights = sum(p.numel() for p in model.unet.parameters()) * b + sum(p.numel() for p in model.vae.parameters()) * 4
    if model.text_encoder is not None:
        weights += sum(p.numel() for p in model.text_encoder.parameters()) * b
    h, w = latent_hw
    th, tw = (min(h, plan["tile"]), min(w, plan["tile"])) if plan["tile"] else (h, w)
    batch = 1 if guidance == 1 else 2
    unet = _kunet_bytes(ucfg, th, tw, batch, b) if hasattr(ucfg, "self_attn_depths") else \
        _ldm_unet_bytes(ucfg, th, tw, batch, b)
    f = vcfg.downscale
    if plan["vae_tile"]:  # tiling.tiled_decode: mid block on the whole map (chunked attention) + tiles
        from .tiling.engine import auto_store_bytes
        from .tiling.memory import estimate_vae_bytes
        largest = max(vcfg.ch * m * (f * h >> lvl) * (f * w >> lvl) * 4 for lvl, m in enumerate(vcfg.ch_mult))
        vae = estimate_vae_bytes(vcfg, (1, vcfg.embed_dim, h, w), tile=plan["vae_tile"], halo=16,
                                 store_bytes=auto_store_bytes(largest))
    else:  # plain decode: the mid-block attention materialises (h w)^2 scores
        vae = vcfg.ch * vcfg.ch_mult[0] * (f * h) * (f * w) * 4 * 4 + (h * w) ** 2 * 4
    images = 3 * f * h * f * w * 4 * 4  # output, colour-fix and low-res copies (float32)
    return int(weights + max(unet, vae) + images)


# ------------------------------------------------------------------------------------------------
# the run


def _device(name: str | None) -> str:
    import torch
    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        fail(f"--device {device}: not available ({str(e).splitlines()[0]})")
    return device


def _pick(value, default):
    return default if value is None else value


def _settings(args, model, family: str) -> dict:
    """The pipeline options of the command line: the given values, else the pipeline's ``Defaults``; checked by the
    pipeline's own ``check_options`` (``model`` None: before loading any weights), whose error becomes one line."""
    if family == "x2":
        from .pipelines import x2_latent as P
        D = P.DEFAULTS
        s = dict(steps=args.steps or D.steps, sampler=args.sampler or D.sampler, schedule=args.schedule or D.schedule,
                 guidance=_pick(args.guidance, D.guidance), noise_level=_pick(args.noise_level, D.noise_level))
        check = P.check_options
    elif family == "stablesr":
        from .pipelines import stablesr as P
        if args.noise_level is not None or args.schedule:
            fail("--noise-level / --schedule are not options of StableSR")
        D, sampler = P.DEFAULTS, args.sampler or P.DEFAULTS.sampler
        s = dict(sampler=sampler, steps=D.steps_for(sampler, args.steps), guidance=D.guidance_for(sampler, args.guidance),
                 dec_w=_pick(args.dec_w, D.dec_w), start=args.start or D.start, scale=args.scale or 4.0,
                 input_size=args.input_size)
        check = P.check_options
    else:
        from .pipelines import x4 as P
        if args.schedule:
            fail(f"--schedule is an option of the x2 latent upscaler, not of {family}")
        D = P.DEFAULTS
        level = _pick(args.noise_level, D.noise_level)
        s = dict(steps=args.steps or D.steps, sampler=args.sampler or D.sampler, guidance=_pick(args.guidance, D.guidance),
                 noise_level=int(level) if float(level).is_integer() else level)
        check = P.check_options
    try:
        check(model, **s)
    except ValueError as e:
        fail(_flag_message(e))
    return s


def _flag_message(e: ValueError) -> str:
    """A pipeline's message about one of its options, named as the command-line flag ("noise_level must ..." ->
    "--noise-level must ...")."""
    msg = str(e).splitlines()[0]
    name = msg.split(" ", 1)[0]
    flag = "--" + name.replace("_", "-")
    return flag + msg[len(name):] if any(a.dest == name for a in build_parser()._actions) else msg


def job_x4(model, item: Item, img, common: dict):
    """The x4 job of one image (latent tiles: ``tiling.TiledModel``; VAE tiles: ``tiling.tiled_decode``)."""
    from .pipelines.x4 import prepare_x4
    return prepare_x4(model, img.rgb[None], **common)


def job_x2(model, item: Item, img, common: dict):
    """The x2 job of one image (VAE-encoded) or of one sample of a latents file."""
    from .pipelines.x2_latent import prepare_x2
    if img is None:
        latents, _ = latents_file(item.path)
        return prepare_x2(model, latents[item.index:item.index + 1], vae=model.vae, **common)
    return prepare_x2(model, image=img.rgb[None], vae=model.vae, **common)


def job_stablesr(model, item: Item, img, common: dict):
    """The StableSR job of one image (latent tiles as the reference canvas when large; VAE tiles when large)."""
    from .pipelines.stablesr import prepare_stablesr
    common.pop("vae_dtype")  # the CFW VAE decodes in the model's dtype
    return prepare_stablesr(model, getattr(model, "cfw_vae", None), img.rgb[None], **common)


JOBS = {"x4": job_x4, "x2": job_x2, "stablesr": job_stablesr}


def run_item(model, family: str, item: Item, img, prompt, negative, settings: dict, args, plan: dict, progress: bool,
             split=None):
    """prepare -> sample -> finish of one input, under ``torch.inference_mode()``; ``split``: the group its tiles are
    split over (torchrun with a single input), or None."""
    import torch
    from .pipelines.common import DTYPES
    from .pipelines.job import run
    common = dict(settings, prompt=prompt, negative_prompt=negative, seed=args.seed, color_fix_mode=args.color_fix,
                  tile=plan["tile"], tile_overlap=plan["overlap"], vae_tile=plan["vae_tile"],
                  vae_overlap=plan["vae_overlap"], vae_dtype=DTYPES[args.vae_dtype], progress=progress)
    with torch.inference_mode():
        job = JOBS[family](model, item, img, common)
        return run(job, split)  # torchrun with one input: each step's tiles and the VAE tiles split over the ranks


def _load(path: str, config: str | None, device: str, dtype):
    import sdup
    from .checkpoints import CheckpointError, KeyMismatch
    try:
        return sdup.load(path, config=config, device=device, dtype=dtype)
    except KeyMismatch as e:
        fail(e.one_line())
    except (CheckpointError, ValueError, OSError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


def _attach_vae(model, args, device: str) -> None:
    """x2: use --vae (an SD 1.x / 2.x checkpoint or VAE) for encoding / decoding, or the checkpoint's own vae/."""
    import torch
    if args.vae:
        family = _header_family(args.vae)
        if family not in ("sd1", "sd2", "vae", "x2", "stablesr"):
            fail(f"--vae {args.vae}: a {family} checkpoint; the x2 upscaler needs the SD 1.x / 2.x VAE (an SD "
                 "checkpoint or VAE)")
        other = _load(args.vae, None, device, torch.float32)
        if other.vae is None:
            fail(f"--vae {args.vae}: no VAE in it ({other.family} checkpoint)")
        cfg = getattr(other.vae, "cfg", None)
        if cfg is not None and (cfg.embed_dim != 4 or other.family not in ("sd1", "sd2", "vae", "x2", "stablesr")):
            fail(f"--vae {args.vae}: a {other.family} VAE with {cfg.embed_dim} latent channels; the x2 upscaler needs "
                 "the SD 1.x / 2.x VAE (4 channels, f=8)")
        model.vae = other.vae
        if model.text_encoder is None and other.family == "sd1" and other.text_encoder is not None:
            model.text_encoder, model.tokenizer = other.text_encoder, other.tokenizer  # k-diffusion file: CLIP-L of SD 1.x
    if model.vae is None:
        fail(f"{args.weights} has no VAE (the original k-diffusion file ships the K-UNet only): pass --vae with an "
             "SD 1.x / 2.x checkpoint or VAE (see weights/README.md)")
    if model.text_encoder is None:
        fail(f"{args.weights} has no text encoder (the original k-diffusion file ships the K-UNet only): pass --vae "
             "with an SD 1.x checkpoint (its CLIP ViT-L/14 text encoder is used too)")


def _attach_cfw(model, args, device: str) -> None:
    """StableSR: the CFW autoencoder from --vae (vqgan_cfw_00011.ckpt), kept as ``model.cfw_vae``."""
    import torch
    model.cfw_vae = None
    if not args.vae:
        from .pipelines.upscale_io import note
        note("no --vae: decoding with the checkpoint's plain SD VAE (no CFW fusion, --dec-w unused); the reference "
             "uses vqgan_cfw_00011.ckpt")
        return
    family = _header_family(args.vae)
    if family != "stablesr_cfw_vae":
        fail(f"--vae {args.vae}: a {family} checkpoint; StableSR needs its CFW autoencoder (vqgan_cfw_00011.ckpt)")
    model.cfw_vae = _load(args.vae, None, device, torch.float32)


def _header_family(path: str) -> str:
    """The family of a checkpoint from its keys / shapes only (nothing loaded)."""
    from .checkpoints.loader import inspect
    return inspect(Path(path))[0].family


def cmd_upscale(args) -> int:
    from .pipelines import upscale_io as io
    check_args(args)
    prompt_ids = parse_ids(args.prompt_ids, "--prompt-ids")
    negative_ids = parse_ids(args.negative_prompt_ids, "--negative-prompt-ids")
    prompt = prompt_ids if prompt_ids is not None else args.prompt
    negative = negative_ids if negative_ids is not None else args.negative_prompt
    try:
        inputs = io.expand_inputs(args.inputs)
    except io.UpscaleIOError as e:
        fail(str(e))
    family, meta = which_model(args)
    scale = family_options(args, family)
    _settings(args, meta, family)  # before loading gigabytes

    # header pass: every input readable (and of the right kind) before any work
    items = plan_items(inputs, family, args.max_pixels, decode=not args.dry_run)
    try:
        outputs = io.plan_outputs([it.name for it in items], args.output or DEFAULT_OUTPUT, f"{scale:g}", args.format)
    except io.UpscaleIOError as e:
        fail(str(e))
    if args.dry_run:
        return dry_run(args, meta, family, scale, items, outputs)
    done = [args.skip_existing and io.is_done(o) for o in outputs]
    todo = [(it, o) for it, o, d in zip(items, outputs, done) if not d]
    group = getattr(args, "group", None)
    if group is not None:  # every rank works on the main rank's list (made before any rank writes)
        from .distributed import exchange
        todo = exchange(lambda: todo, group)[0]
    for it, o, d in zip(items, outputs, done):
        if d and (group is None or group.is_main):
            print(f"skip {it.path}{f'[{it.index}]' if it.index is not None else ''} ({o} exists)")
    if not todo:
        print("nothing to do: every output exists (--skip-existing)")
        return 0
    for _, out in todo:  # an unwritable output fails now, not after the sampling
        try:
            can_create(out)
        except OSError as e:
            fail(f"{out}: cannot write the output there ({e.strerror or e})")
    model = load_model(args, family)
    settings = _settings(args, model, family)
    lo = min_side(model, family)
    for it, _ in todo:
        h, w = it.size
        if it.index is None and min(h, w) < lo:
            fail(f"{it.path}: {w}x{h} is smaller than the {family} model's minimum {lo}x{lo}")
    run_all(args, model, family, scale, todo, prompt, negative, settings, lo)
    return 0


def which_model(args):
    """(family, meta model or None): from the checkpoint's header, or from the config for a weight-less --dry-run."""
    if args.weights is None or not Path(args.weights).exists():
        if not args.dry_run or args.weights is not None:
            fail(missing_weights(args.model, args.weights))
        family = "x4" if args.model == "auto" else args.model
        if family not in IMPLEMENTED:
            not_implemented(family)
        if family == "stablesr" and not args.config:
            fail("--dry-run for stablesr needs --weights (only the checkpoint's header is read) or its upstream YAML "
                 "(--config v2-finetune_text_T_512.yaml)")
        return family, meta_model_from_config(family, args.config)
    family = detect_family(args)
    if family not in IMPLEMENTED:
        not_implemented(family)
    if not args.dry_run:
        return family, None
    from .checkpoints.loader import inspect
    _, meta, error = inspect(Path(args.weights), config=args.config)
    if meta is None or meta.unet is None:
        fail(f"{args.weights}: cannot build the model from its header ({error or 'no UNet: an incomplete diffusers folder?'})")
    if meta.vae is None and family == "x2":
        meta.vae = meta_model_from_config("x2", None).vae  # decoded with --vae: the SD VAE
    if meta.vae is None:
        fail(f"{args.weights}: cannot build the model from its header (no VAE: an incomplete diffusers folder?)")
    return family, meta


def family_options(args, family: str) -> float:
    """Options that belong to another upscaler are refused; the colour fix default filled in. Returns the scale."""
    if args.color_fix is None:
        args.color_fix = "wavelet" if family == "stablesr" else "none"
    for name, value in (("--dec-w", args.dec_w), ("--scale", args.scale), ("--start", args.start),
                        ("--input-size", args.input_size)):
        if value is not None and family != "stablesr":
            fail(f"{name} is an option of StableSR, not of the {family} upscaler")
    if args.vae and family == "x4":
        fail(f"--vae is an option of the x2 and stablesr upscalers (the {family} upscaler uses its own VAE)")
    return args.scale if family == "stablesr" and args.scale is not None else SCALES[family]


def dry_run(args, meta, family: str, scale, items, outputs) -> int:
    """Print output sizes, the tile plan and a memory estimate per input; nothing loaded, nothing written."""
    from .pipelines import upscale_io as io
    settings = _settings(args, meta, family)
    lo = min_side(meta, family)
    rows = []
    for it, out in zip(items, outputs):
        h, w = it.size
        if it.index is None and min(h, w) < lo:
            fail(f"{it.path}: {w}x{h} is smaller than the {family} model's minimum {lo}x{lo}")
        lat = latent_size(meta, family, (h, w), it.latent, scale, args.input_size)
        plan = tile_settings(args, lat, family)
        row = dict(input=str(it.path) + (f"[{it.index}]" if it.index is not None else ""), output=str(out),
                   in_size=(h, w), out_size=(scale * h, scale * w), **plan,
                   peak_bytes=estimate_peak_bytes(meta, lat, plan, args.dtype, settings["guidance"]))
        if args.skip_existing and io.is_done(out):
            row["skip"] = "output exists"
        rows.append(row)
    print(io.dry_run_report(rows))
    extra = (f"dec_w {settings['dec_w']:g}, start {settings['start']}" if family == "stablesr"
             else f"noise level {settings['noise_level']:g}")
    print(f"model: {family} from {meta.source} (meta device, nothing loaded); sampler {settings['sampler']}, steps "
          f"{settings['steps']}, guidance {settings['guidance']}, {extra}, dtype {args.dtype}; dry run: nothing "
          "written")
    return 0


def load_model(args, family: str):
    """The weights (plus --vae), checked complete, with fused q/k/v and, with --compile, a compiled UNet."""
    from .optimize import compile_model, prepare
    from .pipelines.common import DTYPES
    group = getattr(args, "group", None)
    device = _device(args.device or (group.device if group is not None and group.device != "cpu" else None))
    model = _load(args.weights, args.config, device, DTYPES[args.dtype])
    if family == "x2":
        _attach_vae(model, args, device)
    if family == "stablesr":
        _attach_cfw(model, args, device)
    lacking = [c for c in ("unet", "vae", "text_encoder") if getattr(model, c) is None]
    if lacking:
        fail(f"{args.weights}: the checkpoint has no {' / '.join(lacking)} (an incomplete diffusers folder?); the "
             f"{family} upscaler needs UNet, VAE and text encoder")
    # fused q/k/v, bf16 oneDNN Linears, the memory format (the state dict is unchanged); recorded in the outputs
    args.memory_format_used = prepare(model, args.memory_format)
    if args.compile:
        compile_model(model, vae_decoder=False)  # UNet forward, dynamic shapes (tiles / sizes do not recompile)
    return model


def run_all(args, model, family: str, scale, todo, prompt, negative, settings: dict, lo: int) -> None:
    """The loop: read, prepare -> sample -> finish, write; a user-facing failure ends in one line. Under torchrun
    (``args.group``) the inputs are dealt out to the ranks in rounds, or, for a single input, its tiles are."""
    from tqdm import tqdm
    from .distributed import RankFailed, exchange
    group = getattr(args, "group", None)
    main = group is None or group.is_main
    world = 1 if group is None or len(todo) == 1 else group.world_size
    bar = tqdm(total=len(todo), desc="images", unit="img", disable=args.quiet or not main or len(todo) < 2,
               file=sys.stderr)
    path = None
    try:
        for first in range(0, len(todo), world):
            k = first + (group.rank if world > 1 else 0)
            path = todo[k][0].path if k < len(todo) else None
            writer = main or world > 1  # one input over all ranks (its tiles split): the main rank writes it
            split = group if world == 1 else None  # a folder: each rank runs its own input alone
            work = (lambda: run_one(args, model, family, scale, *todo[k], prompt, negative, settings, lo, writer,
                                    split)) \
                if k < len(todo) else (lambda: None)
            for line in (exchange(work, group) if group is not None else [work()]):
                if line and main:
                    print(line)
            bar.update(min(world, len(todo) - first))
    except RankFailed as e:
        fail(str(e))
    except (ValueError, OSError) as e:  # UpscaleIOError included
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except RuntimeError as e:  # torch.OutOfMemoryError and friends; anything else is a bug: keep the traceback
        if "out of memory" not in str(e).lower() and "can't allocate memory" not in str(e).lower():
            raise
        fail(f"out of memory upscaling {path} ({str(e).splitlines()[0][:120]}); try a smaller --tile / --vae-tile "
             "(see --dry-run for the estimate) or --dtype fp16")
    except KeyboardInterrupt as e:
        fail(f"{'terminated' if isinstance(e, Terminated) else 'interrupted'} (no partial output written)")


def run_one(args, model, family: str, scale, it: Item, out: Path, prompt, negative, settings: dict, lo: int,
            writer: bool, split=None) -> str | None:
    """Read, upscale and (``writer``) write one input; returns the line to print."""
    from .pipelines import upscale_io as io
    img, size = None, it.size
    if it.index is None:
        img = io.read_image(it.path, args.max_pixels)
        for n in img.notes:
            io.note(n)
        if min(img.size) < lo:
            raise io.UpscaleIOError(f"{it.path}: {img.size[1]}x{img.size[0]} is smaller than the {family} model's "
                                    f"minimum {lo}x{lo}")
        size = img.size
    plan = tile_settings(args, latent_size(model, family, size, it.latent, scale, args.input_size), family)
    t0 = time.time()
    progress = not args.quiet and writer
    result = run_item(model, family, it, img, prompt, negative, settings, args, plan, progress, split)
    if not writer:  # tile-parallel: every rank computed the same image, the main rank writes it
        return None
    write_output(args, it, img, out, result, scale, time.time() - t0)
    return f"wrote {out}"


def write_output(args, it: Item, img, out: Path, result, scale, seconds: float) -> None:
    """The image with its parameters (what was run, the input and the time), written atomically."""
    from .pipelines import upscale_io as io
    params = result.sample_parameters(0)
    params.pop("batch_index", None)
    params.update(input=it.path.name, seed=args.seed, scale=scale, tiling=params.get("tiling", "off"),
                  seconds=round(seconds, 2), memory_format=getattr(args, "memory_format_used", None))
    if img is not None:
        params.update(input_bits=img.bits, alpha="upscaled separately (bicubic)" if img.alpha is not None else None)
    else:
        params.update(input_index=it.index, latents_source=_latents_source(it.path))
    if args.vae:
        params["vae"] = str(args.vae)
    params.update(reproduction(args, it))
    params = {k: v for k, v in params.items() if v is not None}
    out.parent.mkdir(parents=True, exist_ok=True)
    io.write_image(out, result.images[0], img.alpha if img is not None else None,
                   bits=img.bits if img is not None else 8, parameters=params)


PATH_OPTIONS = ("weights", "config", "vae")  # file options a recorded command names, resolved against its folder


def reproduction(args, it: Item) -> dict:
    """What ``--rerun`` needs: the command as given, the folder it ran in, the input's full path, and the weights' and
    config's sha256."""
    from .fileio import fingerprint
    return dict(command=getattr(args, "argv", None), cwd=getattr(args, "cwd", None) or os.getcwd(),
                input_path=str(it.path.resolve()),
                weights_sha256=fingerprint(args.weights), config=str(Path(args.config).resolve()) if args.config else None,
                config_sha256=fingerprint(args.config) if args.config else None)


def rerun_args(parser, args):
    """The arguments that made ``args.rerun``, on its recorded input, writing to ``-o``; the weights must be the same."""
    from .fileio import fingerprint
    from .pipelines import upscale_io as io
    made = Path(args.rerun)
    if args.inputs:
        fail("--rerun takes no inputs: it runs the input recorded in the output")
    try:
        params = io.read_parameters(made) if made.is_file() else None
    except (OSError, ValueError) as e:
        fail(f"--rerun {made}: not readable ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if not params or "command" not in params:
        fail(f"--rerun {made}: no recorded command (not written by this version of sdup's upscaler)")
    old = parser.parse_args(params["command"])
    for name in PATH_OPTIONS:
        value = getattr(old, name)
        if value and not Path(value).is_absolute():
            setattr(old, name, str(Path(params["cwd"]) / value))
    if old.weights and Path(old.weights).exists() and fingerprint(old.weights) != params.get("weights_sha256"):
        fail(f"--rerun {made}: {old.weights} is not the file that made it (its sha256 differs)")
    if params.get("config_sha256") and old.config and fingerprint(old.config) != params["config_sha256"]:
        fail(f"--rerun {made}: {old.config} changed since the run (its sha256 differs)")
    old.inputs, old.output, old.rerun = [params["input_path"]], args.output, None
    old.argv, old.cwd = params["command"], params["cwd"]  # recorded again as they were
    old.skip_existing, old.dry_run, old.quiet = False, args.dry_run, args.quiet
    return old


def _latents_source(path: Path):
    """The generation parameters stored in a latents file by scripts/txt2img.py (None if absent)."""
    return latents_file(path)[1].get("parameters")


def upscale_main(argv=None, prog: str | None = None) -> int:
    from . import distributed
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.rerun:
        args = rerun_args(parser, args)
    elif not args.inputs:
        parser.error("the following arguments are required: INPUT (or --rerun OUTPUT)")
    else:
        args.argv = argv
    args.group = distributed.from_environment()  # None unless started by torchrun with more than one process
    try:
        with sigterm_as_interrupt():
            return cmd_upscale(args)
    finally:
        distributed.close(args.group)
