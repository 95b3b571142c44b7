"""Helpers shared by the pipelines: images, files, prompts, seeds and samplers.

Images
    tensor_to_pil / pil_to_tensor     (C, H, W) float in [0, 1] <-> PIL (8-bit; 16-bit for one channel, "I;16")
    load_image(path)                  any image Pillow reads -> (3, H, W) in [0, 1]; 16-bit PNGs keep 16 bits
    save_png(image, path, parameters, bits=8|16)
                                      PNG with the generation parameters as an iTXt chunk "parameters" (JSON),
                                      written to a temporary name and renamed (never a half-written file);
                                      16-bit RGB PNGs are encoded here (Pillow has no 16-bit RGB mode)
    read_png_parameters(path)         the JSON back, or None
Prompts
    token_ids(model, prompts)         strings (CLIP BPE) or token ids -> (B, 77) int64, padded as the model's tokenizer
    encode_prompts(model, prompts)    -> text-encoder ``.context`` (B, 77, D): what SD 1.x / 2.x UNets attend to
Seeds
    sample_seeds(seed, n)             [seed, seed + 1, ...] (a random base seed when None)
    make_generators(seeds)            one CPU ``torch.Generator`` per sample: sample i does not depend on the batch
Samplers
    parse_sampler(name)               = ``sdup.diffusion.samplers.get_sampler`` (the one table: ``SAMPLERS``)
    discrete_timesteps / sigma_grid   the reference grids (``job.ldm_grid`` builds the denoiser on them)
Inputs and outputs
    check_images(image, image_range)  tensors / PIL images -> (B, 3, h, w) in [-1, 1], with clear errors
    decode_latents(vae, latents)      scaled latents -> images, the VAE in fp32 by default, one sample at a time
    DTYPES, dtype_name                "fp32" | "fp16" | "bf16" <-> torch dtypes, and the name recorded
"""
from __future__ import annotations

import json
import math
import random
import struct
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion.samplers import SAMPLER_NAMES as _SAMPLER_NAMES
from ..diffusion.samplers import Sampler, get_sampler
from ..fileio import atomic_write  # noqa: F401  (re-exported: pipelines write through it)

Tensor = torch.Tensor
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # command-line names
PARAMETERS_KEY = "parameters"  # PNG text keyword holding the JSON parameters

# ------------------------------------------------------------------------------------------------
# files


def output_paths(out: str | Path, n: int, stem: str = "sample", suffix: str = ".png",
                 names: Sequence[str] | None = None) -> list[Path]:
    """Where ``n`` images go. ``out`` ending in ``suffix`` is a file: used as is for one image,
    ``name-0.png, name-1.png, ...`` for more. Anything else is a folder (created when written): files
    ``{names[i]}.png`` or ``{stem}-{i}.png``, numbered ``-1``, ``-2``, ... instead of overwriting existing files."""
    out = Path(out)
    if out.suffix.lower() == suffix:
        if out.is_dir():
            raise ValueError(f"{out}: is a folder, but the name looks like a {suffix} file")
        return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder (give a folder or a {suffix} file name)")
    paths: list[Path] = []
    for i in range(n):
        base = names[i] if names is not None else f"{stem}-{i}"
        p, k = out / f"{base}{suffix}", 0
        while p.exists() or p in paths:
            k += 1
            p = out / f"{base}-{k}{suffix}"
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------------
# tensors <-> PIL


def _check_image(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image tensor (C, H, W) with C in 1, 3, 4, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    return x.detach().float().cpu().clamp(0, 1)


def to_uint(x: Tensor, bits: int = 8) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, C) uint8 / uint16, rounded to nearest (diffusers ``numpy_to_pil``; CompVis'
    script truncates instead, at most 1/255 darker)."""
    x = _check_image(x)
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    top = (1 << bits) - 1
    return (x.permute(1, 2, 0).double() * top).round().numpy().astype(np.uint8 if bits == 8 else np.uint16)


def tensor_to_pil(x: Tensor, bits: int = 8):
    """(C, H, W) in [0, 1] -> PIL image: RGB / RGBA / L for 8 bits, "I;16" for one channel at 16 bits
    (Pillow has no 16-bit colour mode: write those with ``save_png(..., bits=16)``)."""
    from PIL import Image
    a = to_uint(x, bits)
    if bits == 16:
        if a.shape[2] != 1:
            raise ValueError("Pillow has no 16-bit RGB mode: use save_png(image, path, bits=16)")
        return Image.fromarray(a[:, :, 0])  # uint16 2-D -> "I;16"
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)  # uint8 -> L / RGB / RGBA


def pil_to_tensor(img, alpha: bool = False) -> Tensor:
    """PIL image (any common mode) -> (3, H, W) float32 in [0, 1] (``alpha=True``: (4, H, W) when the image has
    transparency). Grey images are repeated to 3 channels; 16-bit greys ("I;16", "I") are divided by 65535,
    float images ("F") are taken as [0, 1]. Without ``alpha`` the transparency is dropped (colour kept as stored)."""
    mode = img.mode
    has_alpha = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info)
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img, dtype=np.float64) / 65535.0
    elif mode == "F":
        a = np.asarray(img, dtype=np.float64)
    else:
        target = "RGBA" if has_alpha else "RGB"
        a = np.asarray(img.convert(target), dtype=np.float64) / 255.0
    t = torch.from_numpy(np.ascontiguousarray(a)).float().clamp(0, 1)
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    if t.shape[0] == 4 and not alpha:
        t = t[:3]
    return t.contiguous()


def load_image(path: str | Path, alpha: bool = False) -> Tensor:
    """Read an image file -> (3, H, W) float32 in [0, 1] (``alpha=True``: (4, H, W) when it has transparency).
    16-bit PNGs are decoded here at full precision (Pillow would truncate 16-bit colour to 8 bits); JPEG EXIF
    orientation is applied. Unreadable files raise ``ValueError`` with one line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such image file")
    try:
        with open(path, "rb") as fh:
            is_png = fh.read(8) == _PNG_SIG
        png = _read_png(path) if is_png else None
    except (ValueError, zlib.error, struct.error) as e:
        raise ValueError(f"{path}: not a readable PNG ({e})") from None
    if png is not None and png.dtype == np.uint16:
        t = torch.from_numpy(png.astype(np.float32) / 65535.0).permute(2, 0, 1)
        if t.shape[0] in (1, 2):  # grey (+ alpha)
            t = torch.cat([t[:1].expand(3, -1, -1), t[1:]])
        return (t if alpha else t[:3]).contiguous()
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({str(e).splitlines()[0]})") from None
    return pil_to_tensor(img, alpha=alpha)


# ------------------------------------------------------------------------------------------------
# PNG files with parameters


def _json(parameters: dict) -> str:
    return json.dumps(parameters, ensure_ascii=False, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def save_png(image, path: str | Path, parameters: dict | None = None, bits: int = 8) -> Path:
    """Write ``image`` ((C, H, W) tensor in [0, 1] or a PIL image) as PNG with ``parameters`` as JSON in an
    iTXt chunk named "parameters". ``bits=16`` writes 16 bits per channel. Atomic (temporary file + rename)."""
    path = Path(path)
    text = None if parameters is None else _json(parameters)
    if bits == 16:
        if not isinstance(image, Tensor):
            image = pil_to_tensor(image, alpha=True)
        arr = to_uint(image, 16)
        return atomic_write(path, lambda tmp: tmp.write_bytes(encode_png(arr, {PARAMETERS_KEY: text} if text else {})))
    from PIL.PngImagePlugin import PngInfo
    img = tensor_to_pil(image, 8) if isinstance(image, Tensor) else image
    info = PngInfo()
    if text is not None:
        info.add_itxt(PARAMETERS_KEY, text)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=info))


def read_png_parameters(path: str | Path) -> dict | None:
    """The JSON written by ``save_png`` (None when the file has no "parameters" text)."""
    from PIL import Image
    with Image.open(path) as img:
        text = getattr(img, "text", {}).get(PARAMETERS_KEY) or img.info.get(PARAMETERS_KEY)
    return None if text is None else json.loads(text)


_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # PNG colour type -> channels (grey, RGB, grey+alpha, RGBA)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(arr: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """(H, W, C) uint8 / uint16 array, C in 1-4 -> PNG bytes (filter 0, zlib level 6, UTF-8 iTXt chunks)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    h, w, c = arr.shape
    ctype = {1: 0, 3: 2, 2: 4, 4: 6}[c]
    depth = 16 if arr.dtype == np.uint16 else 8
    rows = arr.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1).view(np.uint8)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()
    out = [_PNG_SIG, _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))]
    for key, value in (text or {}).items():  # keyword, 0, compression flag 0, method 0, language "", translated ""
        out.append(_chunk(b"iTXt", key.encode("latin-1") + b"\x00\x00\x00\x00\x00" + value.encode("utf-8")))
    out += [_chunk(b"IDAT", zlib.compress(raw, 6)), _chunk(b"IEND", b"")]
    return b"".join(out)


def _read_png(path: Path) -> np.ndarray | None:
    """Decode a non-interlaced 8/16-bit grey/RGB(A) PNG -> (H, W, C) uint8/uint16; None for what Pillow should
    handle (palette, < 8 bits, interlaced)."""
    data = path.read_bytes()
    pos, idat, hdr = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if len(body) != n:
            raise ValueError("truncated chunk")
        if kind == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + n
    if hdr is None:
        raise ValueError("no IHDR chunk")
    w, h, depth, ctype, _, _, interlace = hdr
    if depth not in (8, 16) or ctype not in _CHANNELS or interlace:
        return None
    bpp = _CHANNELS[ctype] * depth // 8
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    if raw.size < h * (1 + w * bpp):
        raise ValueError("truncated image data")
    px = unfilter_png(raw[: h * (1 + w * bpp)].reshape(h, 1 + w * bpp), w, bpp)
    if depth == 16:
        return px.reshape(h, w, -1).view(">u2").astype(np.uint16)
    return px.reshape(h, w, -1)


def unfilter_png(rows: np.ndarray, width: int, bpp: int) -> np.ndarray:
    """Undo the PNG per-row filters (None, Sub, Up, Average, Paeth) -> (H, W, bpp) uint8.

    Each byte depends on its left (a), upper (b) and upper-left (c) neighbours, so pixels on one anti-diagonal
    row + column = d are independent: the loop runs over H + W - 1 diagonals, each vectorised."""
    h = rows.shape[0]
    ftype = rows[:, 0].astype(np.int32)
    if ftype.size and ftype.max() > 4:
        raise ValueError(f"unknown PNG filter type {int(ftype.max())}")
    f = rows[:, 1:].reshape(h, width, bpp).astype(np.int32)
    out = np.zeros((h + 1, width + 1, bpp), np.int32)  # zero row/column in front: the out-of-image neighbours
    all_rows = np.arange(h)
    for d in range(h + width - 1):
        r = all_rows[max(0, d - width + 1): min(h, d + 1)]
        p = d - r
        a, b, c = out[r + 1, p], out[r, p + 1], out[r, p]
        pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        ft = ftype[r][:, None]
        pred = np.select([ft == 0, ft == 1, ft == 2, ft == 3], [0, a, b, (a + b) >> 1], paeth)
        out[r + 1, p + 1] = (f[r, p] + pred) & 255
    return out[1:, 1:].astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# prompts


def _text_config(model):
    if model.text_encoder is None:
        raise ValueError(f"{model.family} model has no text encoder: pass prompt embeddings instead")
    return model.text_encoder.cfg


def _rows(prompts) -> list:
    """Prompts as a list of rows, each a string or a list of token ids."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Tensor):
        if prompts.is_floating_point():
            raise ValueError("got a float tensor where token ids were expected (embeddings go to prompt_embeds=)")
        t = prompts.reshape(1, -1) if prompts.ndim == 1 else prompts
        if t.ndim != 2:
            raise ValueError(f"token ids must be (L,) or (B, L), got {tuple(prompts.shape)}")
        return t.tolist()
    if isinstance(prompts, Sequence) and len(prompts) > 0:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in prompts):
            return [list(prompts)]
        rows = []
        for v in prompts:
            if isinstance(v, str):
                rows.append(v)
            elif isinstance(v, Tensor) and not v.is_floating_point() and v.ndim == 1:
                rows.append(v.tolist())
            elif isinstance(v, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                rows.append([int(i) for i in v])
            else:
                break
        else:
            return rows
    raise ValueError("prompts must be a string, token ids, or a list of strings / token-id lists")


def token_ids(model, prompts) -> Tensor:
    """Prompts -> (B, context_length) int64 token ids, padded with the model's pad token.

    ``prompts``: a string, token ids (a (L,) / (B, L) int tensor or a list of ints), or a list whose rows are
    strings or token-id lists. Strings go through the CLIP BPE ``model.tokenizer``; token ids are taken verbatim
    INCLUDING the start / end tokens and padded with ``pad_token_id`` to the context length. Text needs a BPE
    tokenizer, which the tiny test encoders (vocabulary 256) do not have -- except the empty prompt, which is
    ``[bos, eos, pad, ...]`` for any vocabulary (exactly what the CLIP tokenizer makes of "")."""
    cfg = _text_config(model)
    rows = _rows(prompts)
    ids = torch.full((len(rows), cfg.context_length), cfg.pad_token_id, dtype=torch.long)
    texts = [i for i, r in enumerate(rows) if isinstance(r, str) and (r or model.tokenizer is not None)]
    if texts:
        if model.tokenizer is None:
            raise ValueError(f"this text encoder (vocabulary {cfg.vocab_size}) has no BPE tokenizer: "
                             "give the prompt as token ids")
        ids[texts] = model.tokenizer([rows[i] for i in texts])
    for i, row in enumerate(rows):
        if isinstance(row, str):
            if row or model.tokenizer is not None:
                continue
            row = [cfg.bos_token_id, cfg.eos_token_id]
        if not 0 < len(row) <= cfg.context_length:
            raise ValueError(f"a token-id prompt needs 1 to {cfg.context_length} ids, got {len(row)}")
        if min(row) < 0 or max(row) >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got {min(row)}..{max(row)}")
        ids[i, : len(row)] = torch.tensor(row)
    return ids


def encode_prompts(model, prompts) -> Tensor:
    """Prompts (see ``token_ids``) -> the text encoder's ``.context`` (B, 77, D): last layer after the final
    LayerNorm for SD 1.x, penultimate layer + ln_final for SD 2.x (the encoder's config decides). Identical
    prompts are encoded once, so a row does not depend on the other rows of the batch."""
    ids = token_ids(model, prompts)
    uniq, inverse = torch.unique(ids, dim=0, return_inverse=True)
    device = next(model.text_encoder.parameters()).device
    ctx = model.text_encoder(uniq.to(device)).context
    return ctx[inverse.to(device)]


# ------------------------------------------------------------------------------------------------
# seeds


def sample_seeds(seed: int | Sequence[int] | None, n: int) -> list[int]:
    """Per-sample seeds: ``seed, seed + 1, ..., seed + n - 1`` for an int (a random base seed when None), or the
    given list (length n). Seeds must be in [0, 2**63)."""
    if seed is None:
        seed = random.SystemRandom().randrange(2 ** 32)
    if isinstance(seed, bool) or not isinstance(seed, (int, Sequence)):
        raise ValueError(f"seed must be an int or a list of ints, got {seed!r}")
    seeds = [int(seed) + i for i in range(n)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {n}")
    if any(not 0 <= s < 2 ** 63 for s in seeds):
        raise ValueError("seeds must be in [0, 2**63)")
    return seeds


def make_generators(seeds: Sequence[int], device="cpu") -> list[torch.Generator]:
    """One generator per sample (CPU by default: the same numbers on every machine, as diffusers' CPU
    generators); draws from ``generators[i]`` make sample i independent of the batch it is in."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


# ------------------------------------------------------------------------------------------------
# samplers


def resolve_generators(seed, generator, batch: int) -> tuple[list[int] | None, object]:
    """(seeds, generators): one generator per sample from ``seed`` (seed, seed+1, ...), so sample i is the same in
    a batch of 1 or 3; or the caller's generator(s) as given (then no seeds are recorded)."""
    if generator is None:
        seeds = sample_seeds(seed, batch)
        return seeds, make_generators(seeds)
    generators = list(generator) if isinstance(generator, (list, tuple)) else generator
    if isinstance(generators, list) and len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch}")
    return None, generators


# the one sampler table lives in sdup.diffusion.samplers; these names stay for the callers of the pipelines
SamplerSpec = Sampler
SAMPLER_NAMES = _SAMPLER_NAMES
parse_sampler = get_sampler


def resolve_eta(spec: Sampler, eta: float | None) -> float:
    """``spec.resolve_eta(eta)``: eta for the sampler (None -> its default)."""
    return spec.resolve_eta(eta)


def discrete_timesteps(steps: int, T: int = 1000, offset: int = 1) -> Tensor:
    """The DDIM / PLMS / DDPM grid, descending: ``t_i = i * (T // steps) + offset`` for i < steps.

    This is the first ``steps`` entries of the LDM uniform grid (``ddim_timesteps``) = diffusers' "leading"
    spacing with ``steps_offset=1``: identical to CompVis whenever its grid has exactly ``steps`` entries
    (10, 20, 25, 50, 100, 200, 250, 500, 1000, ...). For other counts CompVis runs a few extra steps (75 -> 77) or
    fails (3, 9, ...: it would index t = 1000); sdup, like diffusers, runs exactly ``steps``. At most ``T - offset``
    steps (999): with one step per timestep the grid would end at t = T, past the schedule."""
    from ..diffusion.schedules import spaced_timesteps
    if not 1 <= steps <= T - offset:
        raise ValueError(f"steps must be in 1..{T - offset} for this sampler, got {steps}")
    return spaced_timesteps(steps, "leading", T, offset).long()


def sigma_grid(spec: Sampler, alphas_cumprod: Tensor, steps: int) -> Tensor:
    """diffusers' default grid for the sigma samplers ("linspace" spacing, interpolated linearly in sigma over the
    training sigmas, final sigma 0; DPM-Solver's own n+1-point variant for dpmpp_2m)."""
    from ..diffusion.schedules import discrete_sigmas
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return discrete_sigmas(alphas_cumprod, steps, "linspace", dpm_solver=spec.name == "dpmpp_2m")[0]


# ------------------------------------------------------------------------------------------------
# what every pipeline returns and records


@dataclass
class Result:
    images: Tensor                 # (B, 3, H, W) float32 in [0, 1], on the CPU
    latents: Tensor                # (B, C, h, w) float32 sampler output (scaled latents)
    parameters: dict = field(default_factory=dict)

    def sample_parameters(self, i: int) -> dict:
        """The parameters of sample i alone (its seed, prompt, noise level), for per-image metadata."""
        p = dict(self.parameters)
        for key in ("prompt", "negative_prompt", "seed", "noise_level"):
            if isinstance(p.get(key + "s"), list):
                p[key] = p.pop(key + "s")[i]
        p["batch_index"] = i
        return p


def check_int(name: str, value, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def check_finite(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def prompt_rows(prompt, batch: int):
    """One prompt (text, or token ids as (L,) / (1, L)) repeated for the batch; other prompts as given."""
    rows = [prompt] if isinstance(prompt, str) else prompt
    if isinstance(rows, (list, tuple)) and len(rows) == 1 and batch > 1:
        rows = list(rows) * batch
    if isinstance(rows, Tensor) and not rows.is_floating_point() and (rows.ndim == 1 or rows.shape[0] == 1) \
            and batch > 1:
        rows = rows.reshape(1, -1).expand(batch, -1)
    return rows


def prompt_context(model, text, embeds, batch: int, what: str) -> Tensor:
    """(batch, 77, D) fp32 context from text / token ids, or from precomputed embeddings."""
    if embeds is not None:
        if not isinstance(embeds, Tensor) or not embeds.is_floating_point() or embeds.ndim not in (2, 3):
            raise ValueError(f"{what}_embeds must be a float tensor (77, D) or (B, 77, D)")
        e = embeds[None] if embeds.ndim == 2 else embeds
    else:
        e = encode_prompts(model, prompt_rows(text, batch))
    if e.shape[0] == 1 and batch > 1:
        e = e.expand(batch, -1, -1)
    if e.shape[0] != batch:
        raise ValueError(f"{what}: got {e.shape[0]} rows for a batch of {batch}")
    dim = getattr(getattr(model.unet, "cfg", None), "context_dim", None)
    if dim is not None and e.shape[-1] != dim:
        raise ValueError(f"{what}: embeddings of width {e.shape[-1]}, the UNet expects {dim}")
    return e.float()


def describe_prompt(prompt):
    """JSON-friendly record of a prompt given as text, token ids or embeddings."""
    if isinstance(prompt, Tensor):
        return {"token_ids": prompt.tolist()}
    if isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], str):
        return {"token_ids": [list(r) if not isinstance(r, int) else r for r in prompt]}
    return prompt


def record_prompts(params: dict, batch: int, guidance: float, seeds, **prompts) -> dict:
    """Add prompt / negative_prompt (text, ids or "<embeddings>") and seeds to a parameters dict.
    ``prompts``: prompt=(value, embeds), negative_prompt=(value, embeds)."""
    for key, (value, embeds) in prompts.items():
        if embeds is not None:
            params[key] = "<embeddings>"
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value) and len(value) == batch:
            params[key + "s"] = list(value)
        else:
            params[key] = describe_prompt(value)
    if guidance == 1:  # the negative prompt was never used
        params.pop("negative_prompt", None)
        params.pop("negative_prompts", None)
    if seeds is not None:
        params["seeds"] = seeds
    return params


def check_images(image, image_range=(0, 1)) -> Tensor:
    """Tensor (3, h, w) / (B, 3, h, w) / list of them, or PIL image(s) -> (B, 3, h, w) float32 in [-1, 1]."""
    lo_hi = tuple(float(v) for v in image_range)
    if lo_hi not in ((0.0, 1.0), (-1.0, 1.0)):
        raise ValueError(f"image_range must be (0, 1) or (-1, 1), got {image_range!r}")
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError("no input image")
    tensors = []
    for it in items:
        if hasattr(it, "mode") and hasattr(it, "convert"):  # PIL
            if it.mode in ("RGBA", "LA", "PA"):
                raise ValueError("the input image has an alpha channel: the upscalers work on RGB; split the alpha off "
                                 "(and upscale it separately) first")
            tensors.append(pil_to_tensor(it)[None] * 2 - 1)
            continue
        if not isinstance(it, Tensor) or not it.is_floating_point() or it.ndim not in (3, 4):
            raise ValueError("image must be a float tensor (3, h, w) / (B, 3, h, w), a PIL image, or a list of them; "
                             f"got {tuple(it.shape) if isinstance(it, Tensor) else type(it).__name__}")
        t = it[None] if it.ndim == 3 else it
        if t.shape[1] == 4:
            raise ValueError("the input image has 4 channels (RGBA): the upscalers work on RGB; split the alpha "
                             "channel off (image[:, :3]) and upscale it separately")
        if t.shape[1] != 3:
            raise ValueError(f"the input image must have 3 (RGB) channels, got {t.shape[1]}")
        t = t.detach().float()
        if t.numel():
            mn, mx = float(t.min()), float(t.max())
            if mn < lo_hi[0] - 0.01 or mx > lo_hi[1] + 0.01:
                hint = " (pass image_range=(-1, 1) for [-1, 1] input)" if mn >= -1.01 and mx <= 1.01 else ""
                raise ValueError(f"image values span [{mn:.3g}, {mx:.3g}], outside image_range {lo_hi}{hint}")
        tensors.append(t * 2 - 1 if lo_hi == (0.0, 1.0) else t)
    if len({tuple(t.shape[1:]) for t in tensors}) != 1:
        sizes = sorted({tuple(t.shape[2:]) for t in tensors})
        raise ValueError(f"all input images must have the same size, got {sizes}")
    x = torch.cat([t.cpu() for t in tensors])
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"empty input image {tuple(x.shape[-2:])}")
    return x


PAD_MODES = ("replicate", "reflect")


def pad_to_multiple(x: Tensor, m: int, pad_mode: str | None, what: str = "image") -> tuple[Tensor, tuple[int, int]]:
    """Pad bottom / right to multiples of m; returns (padded, (pad_h, pad_w))."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if not ph and not pw:
        return x, (0, 0)
    if pad_mode is None:
        raise ValueError(f"the {what} is {h}x{w}, but this model needs height and width that are multiples of "
                         f"{m} (the model downsamples it by {m}); crop / resize it, or pass "
                         f"pad_mode='replicate' or 'reflect' to pad and crop the output back")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES} or None, got {pad_mode!r}")
    if pad_mode == "reflect" and (ph >= h or pw >= w):
        raise ValueError(f"reflect padding of a {h}x{w} image by ({ph}, {pw}) is impossible; use pad_mode='replicate'")
    return F.pad(x, (0, pw, 0, ph), mode=pad_mode), (ph, pw)


# ------------------------------------------------------------------------------------------------
# decoding


def decode_scaled(vae, latents: Tensor, scale_factor: float, *, vae_tile: int | None = None, vae_overlap: int = 8,
                  progress: bool = False, vae_dtype: torch.dtype = torch.float32) -> Tensor:
    """Scaled latents (B, C, h, w) -> the VAE decoder's output in [-1, 1] (not clamped), float32 on the CPU.

    One sample at a time, in ``vae_dtype`` whatever the VAE's stored dtype (a VAE stored in another dtype is cast for
    the call only). fp32 is the default: the x4 VAE overflows in fp16. fp16 / bf16 (less memory and time on a GPU):
    a sample whose half-precision decode is not finite is decoded again in fp32, with a warning, instead of becoming
    a black image. ``vae_tile``: decode in latent tiles with ``tiling.tiled_decode`` (exact, bounded memory; always
    fp32: a half-precision VAE is converted to fp32 in place for it)."""
    p = next(vae.parameters())
    if vae_tile:
        from ..tiling import tiled_decode
        if p.dtype != torch.float32:
            vae.float()
        vae_dtype = torch.float32
        fp32 = lambda z: tiled_decode(vae, z, tile=vae_tile, overlap=vae_overlap, progress=progress)  # noqa: E731
    else:
        fp32 = _decoder_in(vae, torch.float32)
    half = _decoder_in(vae, vae_dtype) if vae_dtype != torch.float32 else None
    out = []
    for i, z in enumerate(latents.float().split(1)):
        z = (z / scale_factor).to(p.device, torch.float32)
        x = half(z.to(vae_dtype)) if half is not None else None
        if x is not None and not torch.isfinite(x).all():
            warnings.warn(f"sdup: the {dtype_name(vae_dtype)} VAE decode of sample {i} is not finite; "
                          "decoded again in fp32", RuntimeWarning, stacklevel=2)
            x = None
        out.append((fp32(z) if x is None else x).float().cpu())
    return torch.cat(out)


def _decoder_in(vae, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """``vae.decode`` computing in ``dtype``: the module itself when it is stored so, else casted copies of its
    parameters (made on the first call, the module untouched)."""
    if next(vae.parameters()).dtype == dtype:
        return vae.decode
    state = {}

    def run(z):
        if not state:
            from ..optimize import MEMORY_FORMATS, choose_memory_format  # half precision: channels_last where faster
            fmt = MEMORY_FORMATS[choose_memory_format(z.device, dtype)]
            state.update({k: (v.to(dtype, memory_format=fmt if v.dim() == 4 else torch.preserve_format)
                              if v.is_floating_point() else v) for k, v in vae.state_dict().items()})
        return _decode_with(vae, state, z)
    return run


def _decode_with(vae, state: dict, z: Tensor) -> Tensor:
    """``vae.decode(z)`` with the parameters in ``state`` (fp32 copies) instead of the module's own."""
    from torch.func import functional_call

    class _Dec(torch.nn.Module):  # functional_call needs a forward: route it to decode
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, z):
            return self.m.decode(z)
    return functional_call(_Dec(vae), {f"m.{k}": v for k, v in state.items()}, (z,))


def decode_latents(vae, latents: Tensor, scale_factor: float | None = None, *, clamp: bool = True,
                   vae_tile: int | None = None, vae_overlap: int = 8, progress: bool = False,
                   vae_dtype: torch.dtype = torch.float32) -> Tensor:
    """Scaled latents -> images on the CPU in [0, 1] (``clamp=False``: the decoder's raw output in [-1, 1]).
    ``vae``: a VAE module or a LoadedModel (its ``.vae``; ``scale_factor`` defaults to the model's, else SD's
    0.18215).  ``decode_scaled`` does the work (fp32 by default, one sample at a time, ``vae_tile``: exact tiled)."""
    module = vae if hasattr(vae, "decoder") else getattr(vae, "vae", vae)
    if scale_factor is None:
        scale_factor = float(getattr(vae, "scale_factor", 0.18215))
    x = decode_scaled(module, latents, scale_factor, vae_tile=vae_tile, vae_overlap=vae_overlap, progress=progress,
                      vae_dtype=vae_dtype)
    return ((x + 1) / 2).clamp(0, 1) if clamp else x


def dtype_name(dtype: torch.dtype) -> str:
    """torch.float16 -> "float16" (what the parameters record)."""
    return str(dtype).replace("torch.", "")
