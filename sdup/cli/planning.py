"""Before any weight is loaded: which upscaler (from the checkpoint's header or ``--model``), its settings, the
``TilePlan`` of each input and, for ``--dry-run``, the report of all of it (a model built on the meta device from the
checkpoint's header or the official configuration: nothing loaded, nothing written)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoints.detect import FAMILY_NAMES
from ..checkpoints.loader import BUILD_ERRORS, FAMILY_DEFAULTS, LoadedModel, inspect, ldm_constants, yaml_params
from ..images import first_line
from ..models import text as T
from ..models.unet import UNet, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from ..pipelines.registry import UPSCALERS, for_family
from ..tiling.memory import estimate_peak_bytes
from ..tiling.plan import TilePlan, default_plan
from .arguments import MIN_SIDE, fail, flag_message, say
from .outputs import is_done

# ------------------------------------------------------------------------------------------------
# which upscaler


def default_upscaler():
    """What ``--model auto`` means without weights: the first row of the table."""
    return next(iter(UPSCALERS.values()))


def missing_weights(model: str, given: str | None) -> str:
    which = UPSCALERS[model] if model != "auto" else default_upscaler()
    where = f"{given}: no such file or folder" if given else "no weights given (--weights)"
    return (f"{where}; the {which.name} upscaler needs {which.expected_files} -- download it as described in "
            f"weights/README.md and pass --weights PATH")


def detect_upscaler(args):
    """The upscaler of the checkpoint's family (header only), checked against --model."""
    det, _, error = inspect(Path(args.weights), config=args.config)
    found = det.family
    if found == "unknown":
        fail(f"{args.weights}: not a supported checkpoint ({error or 'unknown layout'})")
    chosen = UPSCALERS[args.model] if args.model != "auto" else for_family(found)
    if args.model != "auto" and not chosen.loads(found):
        fail(f"--model {args.model} does not match the checkpoint: {args.weights} is a {found} checkpoint "
             f"({FAMILY_NAMES.get(found, found)})")
    if chosen is None:
        names = list(dict.fromkeys(u.family for u in UPSCALERS.values()))
        fail(f"{args.weights} is a {found} checkpoint ({FAMILY_NAMES.get(found, found)}), not an upscaler "
             f"({', '.join(names[:-1])} or {names[-1]})")
    return chosen


def which_model(args):
    """(upscaler, meta model or None): from the checkpoint's header, or from the configuration for a weight-less
    --dry-run."""
    if args.weights is None or not Path(args.weights).exists():
        if not args.dry_run or args.weights is not None:
            fail(missing_weights(args.model, args.weights))
        upscaler = default_upscaler() if args.model == "auto" else UPSCALERS[args.model]
        return upscaler, official_meta_model(upscaler, args.config)
    upscaler = detect_upscaler(args)
    if not args.dry_run:
        return upscaler, None
    _, meta, error = inspect(Path(args.weights), config=args.config)
    if meta is None or meta.unet is None:
        fail(f"{args.weights}: cannot build the model from its header ({error or 'no UNet: an incomplete diffusers folder?'})")
    if meta.vae is None and upscaler.meta_model is not None:
        meta.vae = upscaler.meta_model().vae  # a VAE that comes with --vae: the official one
    if meta.vae is None:
        fail(f"{args.weights}: cannot build the model from its header (no VAE: an incomplete diffusers folder?)")
    return upscaler, meta


def repo_configs() -> Path:
    return Path(__file__).resolve().parents[2] / "configs"


def official_meta_model(upscaler, config: str | None):
    """The upscaler on the meta device from its official configuration: in the code (``Upscaler.meta_model``), or
    an upstream YAML (``--config``, or the official one in configs/)."""
    if upscaler.meta_model is not None:
        return upscaler.meta_model()
    if not config and upscaler.official_config is None:
        fail(f"--dry-run for {upscaler.name} needs --weights (only the checkpoint's header is read) or its upstream "
             f"YAML (--config {upscaler.config_hint})")
    path = Path(config) if config else repo_configs() / upscaler.official_config
    if not path.is_file():
        fail(f"{path}: the official {upscaler.name} config is missing (pass --config)")
    try:
        return meta_model_from_yaml(upscaler.family, path)
    except (ValueError, KeyError, *BUILD_ERRORS) as e:  # a hand-edited YAML (yaml's own errors are ValueErrors)
        fail(f"{path}: not a usable {upscaler.name} config ({first_line(e)[:200]})")


def meta_model_from_yaml(family: str, path: str | Path) -> LoadedModel:
    """A LoadedModel of ``family`` on the meta device from an upstream YAML (UNet, VAE and the text encoder it
    names)."""
    params = yaml_params(Path(path)).get("params", {})
    out = LoadedModel(family=family, source=str(path))
    out.prediction = params.get("parameterization", FAMILY_DEFAULTS[family]["prediction"])
    ldm_constants(out, params)
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


# ------------------------------------------------------------------------------------------------
# its options


def upscaler_options(args, upscaler) -> float:
    """Options that belong to another upscaler are refused; the colour fix default filled in. Returns the scale."""
    if args.color_fix is None:
        args.color_fix = upscaler.color_fix
    for owner in UPSCALERS.values():
        for dest in owner.own_options:
            if getattr(args, dest) is not None and dest not in upscaler.own_options:
                fail(f"--{dest.replace('_', '-')} is an option of {owner.title}, not of the {upscaler.name} upscaler")
    if args.vae and upscaler.attach is None:
        takers = " and ".join(u.name for u in UPSCALERS.values() if u.attach is not None)
        fail(f"--vae is an option of the {takers} upscalers (the {upscaler.name} upscaler uses its own VAE)")
    return args.scale if upscaler.variable_scale and args.scale is not None else upscaler.scale


def settings(args, upscaler, model=None) -> dict:
    """The pipeline options of the command line: the given values, else the upscaler's ``Defaults``; checked by its
    own ``check_options`` (``model`` None: before loading any weights), whose error becomes one line."""
    try:
        chosen = upscaler.settings(args)
        upscaler.check_options(model, **chosen)
    except ValueError as e:
        fail(flag_message(e))
    return chosen


def check_size(item, upscaler, model) -> None:
    """An input image smaller than the upscaler's minimum fails (latents files were checked when read)."""
    lo = max(MIN_SIDE, upscaler.min_side(model))
    h, w = item.size
    if item.index is None and min(h, w) < lo:
        fail(f"{item.path}: {w}x{h} is smaller than the {upscaler.name} model's minimum {lo}x{lo}")


# ------------------------------------------------------------------------------------------------
# the tile plan of one input, and the dry run


def tile_plan(args, upscaler, model, item, size, scale, chosen: dict) -> TilePlan:
    """The ``TilePlan`` of one input of ``size`` (H, W) pixels with its memory estimate: what runs, and what
    ``--dry-run`` prints."""
    latent = upscaler.latent_size(model, size, item.latent, scale, chosen)
    plan = default_plan(latent, upscaler.tiles, upscaler.tile_multiple(model), args.tile, args.tile_overlap,
                        args.vae_tile)
    return plan.with_memory(lambda p: estimate_peak_bytes(model, p.latent, p.tile, p.vae_tile, args.dtype,
                                                          chosen["guidance"], upscaler.unet_bytes))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def plan_line(item, output: Path, scale, plan: TilePlan | None) -> str:
    """One line of the dry run: sizes, then the plan (tile counts, memory, and the ``tiling`` the output will
    record) or why the input is skipped (``plan`` None)."""
    h, w = item.size
    head = f"{item.label} ({w}x{h}) -> {output} ({scale * w}x{scale * h})"
    if plan is None:
        return f"{head}: skipped (output exists)"
    tiling = json.dumps(plan.parameters()) if plan.parameters() else "off"
    return (f"{head}: latent tiles {plan.latent_tiles}, VAE tiles {plan.vae_tiles}, estimated peak memory "
            f"~{format_bytes(plan.peak_bytes)}; tiling {tiling}")


def dry_run_lines(args, upscaler, meta, scale, items, outputs) -> list[str]:
    """The dry run's report: a line per input (output size, tiles, memory), then the model and its settings."""
    chosen = settings(args, upscaler, meta)
    lines = []
    for it, out in zip(items, outputs):
        check_size(it, upscaler, meta)
        plan = tile_plan(args, upscaler, meta, it, it.size, scale, chosen)
        lines.append(plan_line(it, out, scale, None if args.skip_existing and is_done(out, it) else plan))
    lines.append(f"model: {upscaler.name} from {meta.source} (meta device, nothing loaded); sampler "
                 f"{chosen['sampler']}, steps {chosen['steps']}, guidance {chosen['guidance']}, "
                 f"{upscaler.describe(chosen)}, dtype {args.dtype}; dry run: nothing written")
    return lines


def dry_run(args, upscaler, meta, scale, items, outputs) -> int:
    """Print output sizes, the tile plan and a memory estimate per input; nothing loaded, nothing written."""
    for line in dry_run_lines(args, upscaler, meta, scale, items, outputs):
        say(line)
    return 0
