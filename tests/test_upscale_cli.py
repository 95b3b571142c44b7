"""The upscaler CLI (scripts/upscale.py = python -m sdup upscale) and its file handling (sdup.cli.inputs, sdup.images),
on the tiny random-weight x4 checkpoint in the official single-file layout (tests/data/fixtures/x4/model.ckpt +
its YAML; the tiny text encoder has no BPE vocabulary, so prompts are empty or token ids)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import FIXTURES
from sdup import cli
from sdup import images as files
from sdup.images import encode_png
from sdup.cli import inputs

ROOT = Path(__file__).resolve().parents[1]
X4 = FIXTURES / "x4"
WEIGHTS = ["--weights", str(X4 / "model.ckpt"), "--config", str(X4 / "config.yaml")]
FAST = ["--steps", "2", "--quiet", "--seed", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: single-threaded (conftest.py)


def run(capsys, *args):
    """python -m sdup upscale ARGS in-process -> (exit code, stdout, stderr)."""
    try:
        code = cli.main(["upscale", *map(str, args)])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, stdout, err, msg, out: Path):
    """A user mistake: exit code 2, exactly one stderr line "error: ..." containing every string of ``msg``, and
    nothing written under ``out``."""
    assert code == 2, (stdout, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for m in msg:
        assert m in lines[0], (m, lines[0])
    assert not out.exists() or not any(out.iterdir())


def rgb(h, w, seed=0):
    return (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)


def no_partials(folder: Path):
    return not list(folder.rglob("*.partial")) if folder.exists() else True


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(rgb(16, 24, 0)).save(d / "a.png")
    Image.fromarray(rgb(24, 16, 1)).save(d / "b.jpg", quality=95)
    (d / "notes.txt").write_text("not an image: folders only contribute image extensions")
    return d


def test_folder_in_folder_out_script(images, tmp_path):
    """The script end to end in a subprocess: two images, sizes x4, formats kept, parameters stored, no traceback."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "upscale.py"), str(images), "-o", str(out), *WEIGHTS,
                        *FAST], capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a_x4.png", "b_x4.jpg"]
    with Image.open(out / "a_x4.png") as im:
        assert im.size == (96, 64) and im.mode == "RGB"
    with Image.open(out / "b_x4.jpg") as im:
        assert im.size == (64, 96) and im.format == "JPEG"
    p = files.read_parameters(out / "a_x4.png")
    assert p["pipeline"] == "x4" and p["steps"] == 2 and p["noise_level"] == 20 and p["input"] == "a.png"
    assert p["output_size"] == [64, 96] and p["seed"] == 1
    assert files.read_parameters(out / "b_x4.jpg")["input"] == "b.jpg"  # EXIF ImageDescription
    assert "Traceback" not in r.stderr


def test_16_bit_and_rgba_round_trips(tmp_path, capsys):
    d, out = tmp_path / "in", tmp_path / "out"
    d.mkdir()
    g = np.random.RandomState(2)
    a16 = (g.rand(16, 16, 3) * 65535).astype(np.uint16)
    (d / "deep.png").write_bytes(encode_png(a16))
    rgba = np.concatenate([rgb(16, 24, 3), np.zeros((16, 24, 1), np.uint8)], axis=2)
    rgba[:, 12:, 3] = 255
    rgba[4:8, :6, 3] = 128
    Image.fromarray(rgba, "RGBA").save(d / "cut.png")
    Image.fromarray(rgb(16, 16, 4)).save(d / "deep.tif")
    code, stdout, err = run(capsys, d, "-o", out, *WEIGHTS, *FAST, "--prompt-ids", "254,7,9,255")
    assert code == 0, err
    # 16-bit PNG stays 16-bit
    assert (out / "deep_x4.png").read_bytes()[24] == 16
    back = files.read_image(out / "deep_x4.png")
    assert back.bits == 16 and back.size == (64, 64) and back.alpha is None
    assert files.read_parameters(out / "deep_x4.png")["prompt"] == {"token_ids": [254, 7, 9, 255]}
    # RGBA: alpha upscaled separately (bicubic, clamped) and re-attached
    with Image.open(out / "cut_x4.png") as im:
        assert im.mode == "RGBA" and im.size == (96, 64)
        alpha = np.asarray(im)[:, :, 3].astype(np.float64) / 255
    ref = F.interpolate(torch.from_numpy(rgba[:, :, 3] / 255.0)[None, None].float(), size=(64, 96), mode="bicubic",
                        align_corners=False).clamp(0, 1)[0, 0].numpy()
    assert np.abs(alpha - ref).max() <= 1 / 255 + 1e-6
    assert files.read_parameters(out / "cut_x4.png")["alpha"].startswith("upscaled separately")
    # 8-bit TIFF in -> TIFF out with the parameters in ImageDescription
    with Image.open(out / "deep_x4.tif") as im:
        assert im.format == "TIFF" and im.size == (64, 64)
    assert files.read_parameters(out / "deep_x4.tif")["pipeline"] == "x4"
    assert no_partials(out)


def test_icc_profile_and_16_bit_orientation_reach_the_output(tmp_path, capsys):
    """A 16-bit PNG with an ICC profile and EXIF orientation 6 (turn 90 degrees): the output is turned (16 x 24
    stored -> 96 x 64 shown, x4) and carries the profile; a folder at the output name fails before any work."""
    from PIL import ImageCms
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encode_png((np.random.RandomState(6).rand(16, 24, 3) * 65535).astype(np.uint16), icc_profile=icc)
    exif = Image.Exif()
    exif[0x0112] = 6
    body = exif.tobytes()[6:]
    pos = data.index(b"IDAT") - 4
    import struct
    import zlib
    src = tmp_path / "turned.png"
    src.write_bytes(data[:pos] + struct.pack(">I", len(body)) + b"eXIf" + body
                    + struct.pack(">I", zlib.crc32(b"eXIf" + body) & 0xFFFFFFFF) + data[pos:])
    code, _, err = run(capsys, src, "-o", tmp_path / "out", *WEIGHTS, *FAST)
    assert code == 0, err
    back = files.read_image(tmp_path / "out" / "turned_x4.png")
    assert back.bits == 16 and back.size == (96, 64) and back.icc_profile == icc
    (tmp_path / "out" / "turned_x4.png").unlink()
    (tmp_path / "out" / "turned_x4.png").mkdir()
    assert_one_line_error(*run(capsys, src, "-o", tmp_path / "out", *WEIGHTS, *FAST),
                          ["turned_x4.png: cannot write the output there (Is a directory)"], tmp_path / "none")


def test_16_bit_tiff_output(tmp_path, capsys):
    src = tmp_path / "deep.png"
    src.write_bytes(encode_png((np.random.RandomState(5).rand(16, 16, 3) * 65535).astype(np.uint16)))
    code, _, err = run(capsys, src, "-o", tmp_path / "deep.tif", *WEIGHTS, *FAST, "--color-fix", "adain")
    assert code == 0, err
    back = files.read_image(tmp_path / "deep.tif")
    assert back.bits == 16 and back.size == (64, 64)
    p = files.read_parameters(tmp_path / "deep.tif")
    assert p["input_bits"] == 16 and p["color_fix"] == "adain"


def test_vae_dtype_is_applied_and_recorded(images, tmp_path, capsys):
    """--vae-dtype fp16: the decode runs in fp16 (finite here) and the output records it; fp32 is the default."""
    out = tmp_path / "out"
    code, _, err = run(capsys, images / "a.png", "-o", out, *WEIGHTS, *FAST, "--vae-dtype", "fp16")
    assert code == 0, err
    assert files.read_parameters(out / "a_x4.png")["vae_dtype"] == "float16"
    code, _, err = run(capsys, images / "a.png", "-o", tmp_path / "out32", *WEIGHTS, *FAST)
    assert code == 0, err
    assert files.read_parameters(tmp_path / "out32" / "a_x4.png")["vae_dtype"] == "float32"


def test_skip_existing(images, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, images / "a.png", "-o", out, *WEIGHTS, *FAST)
    assert code == 0, err
    target = out / "a_x4.png"
    before = target.stat().st_mtime_ns
    target.write_bytes(target.read_bytes())  # touch: a later rewrite would change the mtime again
    stamp = target.stat().st_mtime_ns
    code, stdout, err = run(capsys, images, "-o", out, *WEIGHTS, *FAST, "--skip-existing")
    assert code == 0, err
    assert "skip" in stdout and target.stat().st_mtime_ns == stamp and before <= stamp
    assert (out / "b_x4.jpg").exists()
    code, stdout, _ = run(capsys, images, "-o", out, *WEIGHTS, *FAST, "--skip-existing")
    assert code == 0 and "nothing to do" in stdout


def test_dry_run_without_weights_writes_nothing(images, tmp_path, capsys):
    out = tmp_path / "out"
    Image.fromarray(rgb(600, 520, 6)).save(images / "big.png")
    code, stdout, err = run(capsys, images, "-o", out, "--model", "x4", "--dry-run")
    assert code == 0, err
    assert "a.png (24x16) -> " in stdout and "(96x64)" in stdout and "latent tiles 1, VAE tiles 1" in stdout
    big = next(line for line in stdout.splitlines() if "big.png" in line)
    assert "(2080x2400)" in big and "latent tiles 36, VAE tiles 25" in big and "GiB" in big  # 128/32: 6 x 6; VAE 128/8: 5 x 5
    assert "x4-upscaling.yaml" in stdout and "nothing written" in stdout
    assert not out.exists()
    # with the checkpoint: built from its header on the meta device
    code, stdout, err = run(capsys, images / "a.png", "-o", out, *WEIGHTS, "--dry-run")
    assert code == 0 and "model.ckpt" in stdout and not out.exists()


@pytest.mark.parametrize("case", ["no_weights", "missing_weights", "wrong_model", "wrong_family", "not_upscaler",
                                  "unreadable", "noise_level", "too_small", "no_match", "file_for_many", "ddim_1000",
                                  "config_other_family", "config_other_size", "text_tower_needs_yaml"])
def test_errors(case, images, tmp_path, capsys):
    out = tmp_path / "out"
    args, msg = {
        "no_weights": ([images], ["no weights given", "weights/README.md", "x4-upscaler-ema"]),
        "missing_weights": ([images, "--weights", tmp_path / "nope.safetensors"],
                            ["nope.safetensors: no such file", "weights/README.md", "x4-upscaler-ema.safetensors"]),
        "wrong_model": ([images, *WEIGHTS, "--model", "stablesr"], ["--model stablesr", "x4 checkpoint"]),
        "wrong_family": ([images, "--weights", FIXTURES / "sd1" / "model.ckpt", "--model", "x4"],
                         ["--model x4", "sd1 checkpoint"]),
        "not_upscaler": ([images, "--weights", FIXTURES / "sd1" / "model.ckpt"], ["sd1 checkpoint", "not an upscaler"]),
        "unreadable": ([images / "bad.png", *WEIGHTS, *FAST], ["bad.png: not a readable image"]),
        "noise_level": ([images, *WEIGHTS, *FAST, "--noise-level", "400"], ["--noise-level must be an integer in 0..350", "400"]),
        "too_small": ([images / "tiny.png", *WEIGHTS, *FAST], ["tiny.png: 4x6", "minimum 8x8"]),
        "no_match": ([str(images / "*.webp"), *WEIGHTS], ["*.webp: nothing matches"]),
        "file_for_many": ([images, *WEIGHTS, "--dry-run"], ["names a file", "2 inputs"]),
        "ddim_1000": ([images / "a.png", *WEIGHTS, "--quiet", "--steps", "1000"], ["steps must be in 1..999"]),
        "config_other_family": ([images, "--weights", X4 / "model.ckpt", "--config", FIXTURES / "sd1" / "config.yaml"],
                                ["the YAML describes LatentDiffusion (sd1 / sd2)", "weights look like x4"]),
        "config_other_size": ([images, "--weights", X4 / "model.ckpt", "--config", ROOT / "configs" / "x4-upscaling.yaml",
                               "--quiet"], ["520 missing and 40 unexpected key(s), e.g. missing input_blocks", "inspect"]),
        "text_tower_needs_yaml": ([images, "--weights", X4 / "model.ckpt", "--quiet"],
                                  ["text encoder's shape cannot be inferred", "pass the checkpoint's upstream YAML"]),
    }[case]
    if case == "unreadable":
        (images / "bad.png").write_bytes(b"this is not a PNG at all")
    if case == "too_small":
        Image.fromarray(rgb(6, 4)).save(images / "tiny.png")
    target = ["-o", out / "one.png"] if case == "file_for_many" else ["-o", out]
    code, stdout, err = run(capsys, *args, *target)
    assert_one_line_error(code, stdout, err, msg, out)
    assert len(err) < 400, err  # a sentence, not a page of keys


def test_corrupt_image_data_fails_before_any_output(images, tmp_path, capsys):
    """A PNG whose header is fine but whose pixel data is garbage is found by the up-front pass over all inputs
    (before the model is loaded): one line, exit 2, nothing written."""
    import struct
    import zlib
    data = bytearray(encode_png(rgb(16, 16, 7)))
    pos = data.index(b"IDAT")
    n = struct.unpack(">I", data[pos - 4:pos])[0]
    data[pos + 4:pos + 4 + n] = bytes(range(n % 256)) * (n // 256) + bytes(n % 256)  # not zlib
    data[pos + 4 + n:pos + 8 + n] = struct.pack(">I", zlib.crc32(bytes(data[pos:pos + 4 + n])) & 0xFFFFFFFF)
    (images / "z_bad.png").write_bytes(bytes(data))
    out = tmp_path / "out"
    code, _, err = run(capsys, images, "-o", out, *WEIGHTS, *FAST)
    assert code == 2 and err.startswith("error: ") and "z_bad.png" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A crash in the middle of writing an output (here: the encoder raises after writing some bytes) leaves
    neither the output nor its temporary file."""
    from PIL import Image as PILImage

    def broken_save(self, fp, *a, **k):
        fp.write(b"half an image")  # the encoders write to memory; the file is written once, at the end
        raise OSError("disk full")
    monkeypatch.setattr(PILImage.Image, "save", broken_save)
    for name in ("o.jpg", "o.webp", "o.tif"):
        with pytest.raises(OSError, match="disk full"):
            files.write_image(tmp_path / name, torch.rand(3, 8, 8), parameters={"a": 1})
    assert not list(tmp_path.iterdir())


def test_script_error_is_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sdup", "upscale", str(tmp_path / "*.png"), "--dry-run"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "nothing matches" in r.stderr, r.stderr


def test_io_helpers(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("b.PNG", "a.jpeg", "c.bmp", "x.txt"):
        (d / name).write_bytes(b"")
    assert [p.name for p in inputs.expand_inputs([d])] == ["a.jpeg", "b.PNG", "c.bmp"]
    assert [p.name for p in inputs.expand_inputs([str(d / "*.jpeg"), d / "a.jpeg"])] == ["a.jpeg"]  # de-duplicated
    with pytest.raises(files.UpscaleIOError, match="no such file"):
        inputs.expand_inputs([tmp_path / "missing.png"])
    paths = inputs.plan_outputs(inputs.expand_inputs([d]), tmp_path / "o", 4)
    assert [p.name for p in paths] == ["a_x4.jpeg", "b_x4.png", "c_x4.png"]  # BMP -> PNG
    assert [p.name for p in inputs.plan_outputs(inputs.expand_inputs([d]), tmp_path / "o", 2, "webp")] == \
        ["a_x2.webp", "b_x2.webp", "c_x2.webp"]
    assert inputs.plan_outputs([d / "a.jpeg"], tmp_path / "x.tif", 4) == [tmp_path / "x.tif"]
    with pytest.raises(files.UpscaleIOError, match="--format"):
        inputs.plan_outputs([d / "a.jpeg"], tmp_path / "x.tif", 4, "png")


def test_exif_orientation_and_write_formats(tmp_path):
    a = rgb(8, 12, 8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.fromarray(a).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    img = files.read_image(tmp_path / "rot.jpg")
    assert img.size == (12, 8) and files.image_size(tmp_path / "rot.jpg") == (12, 8)
    x = torch.rand(3, 8, 8)
    alpha = torch.rand(1, 4, 4)
    for name in ("o.webp", "o.jpg", "o.png", "o.tif"):
        files.write_image(tmp_path / name, x, alpha, parameters={"k": "v\u00e9"}, warn=lambda m: None)
        assert files.read_parameters(tmp_path / name) == {"k": "v\u00e9"}
        back = files.read_image(tmp_path / name)
        assert back.size == (8, 8) and (back.alpha is None) == (name == "o.jpg")
    assert not list(tmp_path.glob("*.partial"))


def test_tiled_run_and_whole_image_tile_equals_untiled(images, tmp_path, capsys):
    """--tile / --vae-tile go through tiling.TiledModel + tiling.tiled_decode; a tile covering the image gives the
    untiled result (up to the tiled decode's float rounding: at most one 8-bit step)."""
    src = images / "a.png"
    outs = {}
    for name, extra in {"plain": [], "cover": ["--tile", "64", "--vae-tile", "64"],
                        "tiled": ["--tile", "16", "--tile-overlap", "8", "--vae-tile", "16"]}.items():
        outs[name] = tmp_path / f"{name}.png"
        code, _, err = run(capsys, src, "-o", outs[name], *WEIGHTS, *FAST, *extra)
        assert code == 0, err
    px = {k: np.asarray(Image.open(v)).astype(int) for k, v in outs.items()}
    assert np.abs(px["plain"] - px["cover"]).max() <= 1
    assert px["tiled"].shape == (64, 96, 3)
    assert files.read_parameters(outs["tiled"])["tiling"] == {"tile": 16, "overlap": 8, "vae_tile": 16, "vae_overlap": 4}
    assert files.read_parameters(outs["plain"])["tiling"] == "off"


# ------------------------------------------------------------------------------------------------
# --model x2: the tiny sd-x2-latent-upscaler diffusers folder (no vae/) + the tiny SD VAE as a bare diffusers VAE
# folder (--vae), images and latents files in

X2 = ["--weights", FIXTURES / "latent_upscaler" / "diffusers", "--vae", FIXTURES / "sd1" / "diffusers" / "vae"]


def write_latents(path, latents, scale_factor="0.18215"):
    from safetensors.torch import save_file
    save_file({"latents": latents}, str(path), metadata={"scale_factor": scale_factor,
                                                         "parameters": '{"prompt": "a red bicycle", "seed": 4}'})


def test_x2_images_and_latents(tmp_path, capsys):
    """Images (any size: padded to 32 and cropped back) and a 2-sample latents file -> 2x outputs, parameters
    recorded (pipeline, vae, the latents file's own generation parameters), RGBA alpha re-attached."""
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(rgb(72, 88, 3)).save(d / "a.png")
    rgba = np.concatenate([rgb(64, 64, 4), np.full((64, 64, 1), 200, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(d / "b.png")
    write_latents(tmp_path / "lat.safetensors", torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0)))
    out = tmp_path / "out"
    code, stdout, err = run(capsys, d, tmp_path / "lat.safetensors", "-o", out, *X2, *FAST, "--guidance", "3")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a_x2.png", "b_x2.png", "lat-0_x2.png", "lat-1_x2.png"]
    with Image.open(out / "a_x2.png") as im:
        assert im.size == (176, 144)
    with Image.open(out / "b_x2.png") as im:
        assert im.size == (128, 128) and im.mode == "RGBA"
        assert np.abs(np.asarray(im)[..., 3].astype(int) - 200).max() <= 1
    with Image.open(out / "lat-1_x2.png") as im:
        assert im.size == (192, 128)  # latent 8 x 12 -> 16 x 24 -> 128 x 192 pixels
    p = files.read_parameters(out / "a_x2.png")
    assert p["pipeline"] == "x2_latent" and p["sampler"] == "euler" and p["steps"] == 2 and p["guidance"] == 3
    assert p["padding"] == {"mode": "replicate", "bottom": 24, "right": 8} and p["vae"].endswith("vae")
    assert "padding" not in files.read_parameters(out / "b_x2.png")
    q = files.read_parameters(out / "lat-1_x2.png")
    assert q["input"] == "lat.safetensors" and q["input_index"] == 1 and q["latents_source"]["seed"] == 4
    # the CLI equals the library call (same seed, one sample of the file)
    import sdup
    from sdup.pipelines.x2_latent import upscale_latents_x2
    m = sdup.load(X2[1])
    lat = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    ref = upscale_latents_x2(m, lat[1:], "", vae=sdup.load(X2[3]), steps=2, guidance=3, seed=1, progress=False)
    with Image.open(out / "lat-1_x2.png") as im:
        got = torch.from_numpy(np.asarray(im).astype(np.float32) / 255).permute(2, 0, 1)
    assert (got - ref.images[0]).abs().max() <= 0.5 / 255 + 1e-6


def test_x2_dry_run_without_weights(tmp_path, capsys):
    Image.fromarray(rgb(512, 768, 0)).save(tmp_path / "big.png")
    code, stdout, err = run(capsys, tmp_path / "big.png", "--model", "x2", "--dry-run", "-o", tmp_path / "o")
    assert code == 0, err
    assert "(768x512) ->" in stdout and "(1536x1024)" in stdout and "sampler euler, steps 75" in stdout
    assert "official sd-x2-latent-upscaler configuration" in stdout and not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["latents_for_x4", "vae_for_x4", "no_vae", "sampler", "noise_level", "bad_latents",
                                  "latent_channels", "latent_scale"])
def test_x2_errors(case, images, tmp_path, capsys):
    lat = tmp_path / "lat.safetensors"
    write_latents(lat, torch.randn(1, 4, 8, 8))
    args, msg = {
        "latents_for_x4": ([lat, *WEIGHTS, *FAST], ["lat.safetensors: a latents file", "only --model x2"]),
        "vae_for_x4": ([images, *WEIGHTS, *FAST, "--vae", X2[3]], ["--vae is an option of the x2"]),
        "no_vae": ([lat, *X2[:2], *FAST], ["has no VAE", "--vae"]),
        "sampler": ([lat, *X2, *FAST, "--sampler", "ddim"], ["--sampler ddim", "euler"]),
        "noise_level": ([lat, *X2, *FAST, "--noise-level", "0.5"], ["k-diffusion checkpoint"]),
        "bad_latents": ([tmp_path / "junk.safetensors", *X2, *FAST], ["junk.safetensors: not a readable latents file"]),
        "latent_channels": ([tmp_path / "c3.safetensors", *X2, *FAST], ["(1, 3, 4, 4)", "SD 1.x / 2.x latents"]),
        "latent_scale": ([tmp_path / "xl.safetensors", *X2, *FAST], ["0.13025", "SDXL"]),
    }[case]
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    write_latents(tmp_path / "c3.safetensors", torch.randn(1, 3, 4, 4))
    write_latents(tmp_path / "xl.safetensors", torch.randn(1, 4, 4, 4), scale_factor="0.13025")
    out = tmp_path / "out"
    assert_one_line_error(*run(capsys, *args, "-o", out), msg, out)


def test_x2_kdiffusion_file_with_sd1_checkpoint(tmp_path, capsys):
    """The original k-diffusion file has the K-UNet only: --vae with an SD 1.x checkpoint supplies the VAE and the
    CLIP text encoder; a bare VAE folder alone is refused in one line. Its noise-level weights allow --noise-level."""
    import sdup
    from sdup.checkpoints.kdiffusion import kunet_kdiffusion_keymap
    from sdup.checkpoints.loader import save_sdup
    from sdup.models.latent_upscaler import KUNet
    import dataclasses
    m = sdup.load(X2[1])
    cfg = dataclasses.replace(m.unet.cfg, noise_aug_embed=True, head_dim=64)  # the file's heads: inferred as 64
    full = KUNet(cfg)
    full.load_state_dict(m.unet.state_dict(), strict=False)
    torch.save({"model_ema": kunet_kdiffusion_keymap(cfg).to_ext(full.state_dict())}, tmp_path / "x2.pth")
    sd1 = tmp_path / "sd1.safetensors"
    save_sdup(sdup.load(FIXTURES / "sd1" / "model.ckpt", config=FIXTURES / "sd1" / "config.yaml"), sd1)
    write_latents(tmp_path / "lat.safetensors", torch.randn(1, 4, 8, 8))
    out = tmp_path / "out"
    base = [tmp_path / "lat.safetensors", "-o", out, "--weights", tmp_path / "x2.pth", *FAST]
    code, _, err = run(capsys, *base, "--vae", X2[3])
    assert code == 2 and "has no text encoder" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run(capsys, *base, "--vae", sd1, "--noise-level", "0.25", "--prompt-ids", "254,7,9,255")
    assert code == 0, err
    p = files.read_parameters(out / "lat_x2.png")
    assert p["noise_level"] == 0.25 and p["vae"].endswith("sd1.safetensors") and p["family"] == "x2"


# ------------------------------------------------------------------------------------------------
# --model stablesr: the tiny upstream StableSR checkpoint + its CFW autoencoder (--vae)

SR = FIXTURES / "stablesr"
SR_WEIGHTS = ["--weights", SR / "model.ckpt", "--config", SR / "config.yaml", "--vae", SR / "cfw_vae.ckpt"]
SR_FAST = [*FAST, "--input-size", "32"]


def test_stablesr_folder(images, tmp_path, capsys):
    """Images -> x4 (and --scale 2.5) outputs with the CFW decoder; StableSR's own defaults recorded (ddpm, dec_w,
    wavelet colour fix); the CLI equals the library call."""
    out = tmp_path / "out"
    code, _, err = run(capsys, images, "-o", out, *SR_WEIGHTS, *SR_FAST, "--dec-w", "0.7")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["a_x4.png", "b_x4.jpg"]
    with Image.open(out / "a_x4.png") as im:
        assert im.size == (96, 64)
    p = files.read_parameters(out / "a_x4.png")
    assert (p["pipeline"], p["sampler"], p["steps"], p["dec_w"], p["color_fix"], p["start"]) == \
        ("stablesr", "ddpm", 2, 0.7, "wavelet", "lr")
    assert p["cfw_vae"].endswith("cfw_vae.ckpt") and p["native_size"] == 32
    import sdup
    from sdup.pipelines.stablesr import upscale_stablesr
    m = sdup.load(SR / "model.ckpt", config=SR / "config.yaml")
    img = torch.from_numpy(rgb(16, 24, 0).astype(np.float32) / 255).permute(2, 0, 1)
    ref = upscale_stablesr(m, sdup.load(SR / "cfw_vae.ckpt"), img, steps=2, dec_w=0.7, seed=1, input_size=32,
                           progress=False)
    with Image.open(out / "a_x4.png") as im:
        got = torch.from_numpy(np.asarray(im).astype(np.float32) / 255).permute(2, 0, 1)
    assert (got - ref.images[0]).abs().max() <= 0.5 / 255 + 1e-6
    code, _, err = run(capsys, images / "a.png", "-o", tmp_path / "o2", *SR_WEIGHTS, *SR_FAST, "--scale", "2.5",
                       "--sampler", "ddim", "--steps", "4", "--negative-prompt-ids", "254,3,255")
    assert code == 0, err
    with Image.open(tmp_path / "o2" / "a_x2.5.png") as im:
        assert im.size == (60, 40)
    q = files.read_parameters(tmp_path / "o2" / "a_x2.5.png")
    assert q["sampler"] == "ddim" and q["guidance"] == 7.0 and q["scale"] == 2.5


def test_stablesr_without_cfw_notes_plain_vae(images, tmp_path, capsys):
    code, _, err = run(capsys, images / "a.png", "-o", tmp_path / "o", *SR_WEIGHTS[:4], *SR_FAST)
    assert code == 0 and "no --vae" in err and "vqgan_cfw_00011" in err, err
    assert "dec_w" not in files.read_parameters(tmp_path / "o" / "a_x4.png")


@pytest.mark.parametrize("case", ["dec_w", "dec_w_for_x4", "sampler", "wrong_vae", "noise_level",
                                  "dry_run_no_weights"])
def test_stablesr_errors(case, images, tmp_path, capsys):
    args, msg = {
        "dec_w": ([*SR_WEIGHTS, *SR_FAST, "--dec-w", "1.5"], ["--dec-w must be in 0..1"]),
        "dec_w_for_x4": ([*WEIGHTS, *FAST, "--dec-w", "0.5"], ["--dec-w is an option of StableSR"]),
        "sampler": ([*SR_WEIGHTS, *SR_FAST, "--sampler", "euler"], ["--sampler euler", "ddpm or ddim"]),
        "wrong_vae": ([*SR_WEIGHTS[:4], "--vae", X4 / "model.ckpt", *SR_FAST], ["x4 checkpoint", "CFW"]),
        "noise_level": ([*SR_WEIGHTS, *SR_FAST, "--noise-level", "20"], ["not options of StableSR"]),
        "dry_run_no_weights": (["--model", "stablesr", "--dry-run"], ["needs --weights"]),
    }[case]
    out = tmp_path / "out"
    assert_one_line_error(*run(capsys, images, "-o", out, *args), msg, out)


def test_stablesr_dry_run_with_weights(tmp_path, capsys):
    Image.fromarray(rgb(128, 192, 0)).save(tmp_path / "p.png")
    code, stdout, err = run(capsys, tmp_path / "p.png", "-o", tmp_path / "o", *SR_WEIGHTS, "--dry-run")
    assert code == 0, err
    assert "(768x512)" in stdout and "sampler ddpm, steps 200" in stdout and "dec_w 0.5" in stdout
    # the latent that runs: 128 x 192 (the tiny VAE has f = 4), 64-px tiles, overlap 32: 3 x 5
    assert "latent tiles 15" in stdout and not (tmp_path / "o").exists()


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header announces width x height but whose pixel data is garbage: reading it whole fails, so
    anything that succeeds on it read the header alone."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib") + chunk(b"IEND", b""))
    return path


def test_huge_image_is_one_line_before_decoding(tmp_path, capsys):
    """20000 x 20000 (400 megapixels): refused from the header, with the count and the option that allows it, in a
    dry run too; --max-pixels raises the limit (the garbage pixel data then fails as unreadable, still one line)."""
    huge = png_header_only(tmp_path / "huge.png", 20000, 20000)
    out = tmp_path / "out"
    for extra in ([], ["--dry-run"]):
        assert_one_line_error(*run(capsys, huge, "-o", out, *WEIGHTS, *FAST, *extra),
                              ["huge.png: 20000x20000 is 400 megapixels", "--max-pixels 400000000"], out)
    assert_one_line_error(*run(capsys, huge, "-o", out, *WEIGHTS, *FAST, "--max-pixels", "400000000"),
                          ["huge.png: not a readable"], out)
    Image.fromarray(rgb(16, 24)).save(tmp_path / "small.jpg")  # through Pillow: the same limit
    assert_one_line_error(*run(capsys, tmp_path / "small.jpg", "-o", out, *WEIGHTS, *FAST, "--max-pixels", "300"),
                          ["small.jpg: 24x16", "--max-pixels 384"], out)
    assert_one_line_error(*run(capsys, tmp_path / "small.jpg", "-o", out, *WEIGHTS, "--max-pixels", "-1"),
                          ["--max-pixels must be >= 0"], out)


def test_dry_run_reads_headers_only(tmp_path, capsys):
    """The plan and the memory estimate come from the header: a 12000 x 8000 PNG whose pixel data is garbage plans
    fine (a decode would fail), and nothing is written."""
    big = png_header_only(tmp_path / "big.png", 12000, 8000)
    code, stdout, err = run(capsys, big, "-o", tmp_path / "out", "--model", "x4", "--dry-run")
    assert code == 0, err
    assert "big.png (12000x8000) -> " in stdout and "(48000x32000)" in stdout and not (tmp_path / "out").exists()
    assert err == ""  # no Pillow warning either


def test_animated_input_notes_first_frame(tmp_path, capsys):
    frames = [Image.fromarray(rgb(16, 16, s)).convert("P") for s in (1, 2, 3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    code, _, err = run(capsys, tmp_path / "anim.gif", "-o", tmp_path / "o.png", *WEIGHTS, *FAST)
    assert code == 0, err
    assert "anim.gif: animated (3 frames): only the first frame is upscaled" in err
    with Image.open(tmp_path / "o.png") as im:
        assert im.size == (64, 64)


def test_unknown_output_extension_and_empty_existing_output(images, tmp_path, capsys):
    out = tmp_path / "o.xyz"
    assert_one_line_error(*run(capsys, images / "a.png", "-o", out, *WEIGHTS, *FAST),
                          ["-o", "o.xyz", "'.xyz' is not an output image format"], out)
    assert not out.exists()
    folder = tmp_path / "results.v2"  # an existing folder keeps working, whatever its name
    folder.mkdir()
    (folder / "a_x4.png").write_bytes(b"")  # an empty file is no finished output: --skip-existing redoes it
    code, stdout, err = run(capsys, images / "a.png", "-o", folder, *WEIGHTS, *FAST, "--skip-existing")
    assert code == 0 and "skip" not in stdout, err
    with Image.open(folder / "a_x4.png") as im:
        assert im.size == (96, 64)


SIGTERM_RUN = """
import sys, time
from sdup.images import write
real = write.atomic_write

def slow_atomic_write(path, write, **kw):
    def slow(tmp):
        write(tmp)
        print("writing", flush=True)
        time.sleep(60)
    return real(path, slow, **kw)

write.atomic_write = slow_atomic_write
from sdup.cli import upscale_main
sys.exit(upscale_main(sys.argv[1:]))
"""


def test_sigterm_during_the_final_write_leaves_nothing(images, tmp_path):
    import signal
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-c", SIGTERM_RUN, str(images / "a.png"), "-o", str(out), *map(str, WEIGHTS),
                          *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    for line in p.stdout:  # the temporary file exists now
        if line.startswith("writing"):
            break
    assert list(out.glob("*.partial")), "the write should be under way"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and err.strip().splitlines()[-1] == "error: terminated (no partial output written)", err
    assert [q.name for q in out.iterdir()] == [".a_x4.png.sdup-state"]  # kept: a rerun resumes at the last step


def test_unwritable_output_fails_before_loading_the_model(images, tmp_path, capsys, monkeypatch):
    """The output location is tried (folders created, a file written and removed) before any weight is read."""
    import sdup.cli.running as U
    loads = []
    monkeypatch.setattr(U, "_load", lambda *a, **k: loads.append(a) or pytest.fail("model loaded"))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should be")
    out = blocker / "sub"
    assert_one_line_error(*run(capsys, images / "a.png", "-o", out / "o.png", *WEIGHTS, *FAST),
                          ["o.png: cannot write the output there"], tmp_path / "none")
    if os.geteuid() != 0:  # root writes through permission bits: only the file-as-folder case applies there
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        assert_one_line_error(*run(capsys, images / "a.png", "-o", ro / "o.png", *WEIGHTS, *FAST),
                              ["o.png: cannot write the output there", "ermission denied"], ro)
    assert loads == []


def test_rerun_from_an_output_gives_identical_pixels(images, tmp_path, capsys):
    """The output records the command, its folder, the input's path and the weights' / config's sha256; --rerun runs
    it again (here with a non-standard checkpoint that needs its --config) and gets the same pixels."""
    import shutil
    weights = tmp_path / "w.ckpt"
    shutil.copy(X4 / "model.ckpt", weights)
    args = ["--weights", weights, "--config", X4 / "config.yaml", "--steps", "2", "--quiet", "--seed", "9",
            "--noise-level", "40", "--prompt-ids", "254,7,255"]
    code, _, err = run(capsys, images, "-o", tmp_path / "first", *args)
    assert code == 0, err
    made = tmp_path / "first" / "b_x4.jpg"
    p = files.read_parameters(made)
    assert p["command"][0] == str(images) and p["input_path"] == str((images / "b.jpg").resolve())
    assert len(p["weights_sha256"]) == 64 and p["config"] == str((X4 / "config.yaml").resolve())
    code, _, err = run(capsys, "--rerun", made, "-o", tmp_path / "again.jpg")
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(tmp_path / "again.jpg")))
    assert files.read_parameters(tmp_path / "again.jpg")["noise_level"] == 40
    # other weights under the same name, a file without a record, inputs given as well: one line each
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert_one_line_error(*run(capsys, "--rerun", made, "-o", tmp_path / "x.jpg"),
                          ["w.ckpt is not the file that made it"], tmp_path / "none")
    assert_one_line_error(*run(capsys, "--rerun", images / "a.png"), ["no recorded command"], tmp_path / "none")
    assert_one_line_error(*run(capsys, images / "a.png", "--rerun", made), ["--rerun takes no inputs"],
                          tmp_path / "none")


def test_dry_run_prints_the_plan_that_runs(images, tmp_path, capsys):
    """The ``tiling`` a --dry-run line prints is the one the output records (one TilePlan for both)."""
    import json
    args = [images / "a.png", "-o", tmp_path / "o.png", *WEIGHTS, *FAST, "--tile", "16", "--tile-overlap", "12",
            "--vae-tile", "12"]
    code, stdout, err = run(capsys, *args, "--dry-run")
    assert code == 0, err
    printed = json.loads(stdout.splitlines()[0].split("; tiling ", 1)[1])
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert files.read_parameters(tmp_path / "o.png")["tiling"] == printed
