"""sdup.images: pixels bit-identical to the hand-written codecs they replace, outputs of those codecs still read,
the ICC profile carried from input to output, the EXIF orientation applied at every depth."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image, ImageCms, ImageOps

from helpers import DATA
from sdup import images

LEGACY = DATA / "images"  # written by the hand-written encoders of f7f8ec7 (see the names below)
LEGACY_FILES = [("legacy16.png", False, 16), ("legacy16a.png", True, 16), ("legacy16.tif", False, 16),
                ("legacy16a.tif", True, 16), ("legacy8.png", True, 8), ("legacy8.tif", True, 8),
                ("legacy8.jpg", False, 8), ("legacy8.webp", True, 8)]
LEGACY_PARAMETERS = {"pipeline": "x4", "prompt": "caf\u00e9 \u2603", "seed": 7}


def legacy_image():
    """The tensors the legacy files were written from."""
    g = torch.Generator().manual_seed(21)
    return torch.rand(3, 5, 7, generator=g), torch.rand(1, 5, 7, generator=g)


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def with_chunk(data: bytes, kind: bytes, body: bytes, before: bytes = b"IDAT") -> bytes:
    """A PNG with one more chunk, inserted before the first ``before`` chunk (b"IEND": after the image data)."""
    pos = data.index(before) - 4
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    return data[:pos] + chunk + data[pos:]


def exif_body(orientation) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()[6:]  # an eXIf chunk holds the TIFF structure without the "Exif\0\0" of JPEG's APP1


@pytest.mark.parametrize("name,has_alpha,bits", LEGACY_FILES)
def test_outputs_of_the_old_encoders_read_as_before(name, has_alpha, bits):
    """Parameters readable, and every pixel as the old reader decoded it (tests/data/images/legacy_reads.npz)."""
    ref = np.load(LEGACY / "legacy_reads.npz")
    assert images.read_parameters(LEGACY / name) == LEGACY_PARAMETERS
    img = images.read_image(LEGACY / name)
    assert img.bits == bits == int(ref[f"{name}:bits"]) and (img.alpha is not None) == has_alpha
    assert np.array_equal(img.rgb.numpy(), ref[f"{name}:rgb"])
    if has_alpha:
        assert np.array_equal(img.alpha.numpy(), ref[f"{name}:alpha"])


@pytest.mark.parametrize("name,has_alpha,bits", LEGACY_FILES)
def test_new_writers_give_the_old_pixels(name, has_alpha, bits, tmp_path):
    """The library-based writers and readers, from the same tensors: the pixels the hand-written codecs gave."""
    rgb, alpha = legacy_image()
    out = images.write_image(tmp_path / name, rgb, alpha if has_alpha else None, bits=bits,
                             parameters=LEGACY_PARAMETERS, warn=lambda m: None)
    new, old = images.read_image(out), images.read_image(LEGACY / name)
    assert new.bits == old.bits and torch.equal(new.rgb, old.rgb)
    assert (new.alpha is None) == (old.alpha is None) and (new.alpha is None or torch.equal(new.alpha, old.alpha))
    assert images.read_parameters(out) == LEGACY_PARAMETERS
    if bits == 16:  # exactly the 16-bit values of the tensor
        assert torch.equal(new.rgb, torch.from_numpy(images.to_uint(rgb, 16)).permute(2, 0, 1).float() / 65535)


def test_png_codec_through_pypng(tmp_path):
    """encode_png: 8 / 16 bits, 1-4 channels, text and ICC chunks that Pillow reads; _read_png gives the array."""
    g = np.random.default_rng(1)
    icc = srgb_profile()
    for depth, dtype in ((8, np.uint8), (16, np.uint16)):
        for c in (1, 2, 3, 4):
            a = g.integers(0, 1 << depth, (6, 9, c)).astype(dtype)
            p = tmp_path / f"{depth}-{c}.png"
            p.write_bytes(images.encode_png(a, {"parameters": '{"k": "\u00e9"}'}, icc_profile=icc))
            assert np.array_equal(images.pngfile._read_png(p), a)
            with Image.open(p) as im:
                assert im.text["parameters"] == '{"k": "\u00e9"}' and im.info["icc_profile"] == icc
    interlaced = tmp_path / "adam7.png"
    Image.fromarray(g.integers(0, 256, (11, 13, 3)).astype(np.uint8)).save(interlaced, interlace=1)
    with Image.open(interlaced) as im:
        assert np.array_equal(images.pngfile._read_png(interlaced), np.asarray(im))


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("fmt", ["png", "tiff", "jpg", "webp"])
def test_icc_profile_goes_from_input_to_output(fmt, bits, tmp_path):
    icc = srgb_profile()
    a16 = (np.random.default_rng(2).random((6, 8, 3)) * 65535).astype(np.uint16)
    src = tmp_path / f"in{bits}.{'tif' if fmt == 'tiff' else fmt}"
    if bits == 16 and fmt in ("jpg", "webp"):
        pytest.skip("8-bit formats")
    if bits == 16:
        src.write_bytes(images.encode_png(a16, icc_profile=icc) if fmt == "png" else images.encode_tiff16(a16, None, icc))
    else:
        Image.fromarray((a16 >> 8).astype(np.uint8)).save(src, icc_profile=icc, **({"lossless": True} if fmt == "webp" else {}))
    img = images.read_image(src)
    assert img.bits == bits and img.icc_profile == icc and img.notes == []
    for out_fmt in ("png", "tiff", "jpg", "webp"):
        out = images.write_image(tmp_path / f"out.{out_fmt}", img.rgb, bits=img.bits, parameters={"a": 1},
                                 icc_profile=img.icc_profile, warn=lambda m: None)
        with Image.open(out) as im:
            assert im.info.get("icc_profile") == icc, out_fmt
        assert images.read_image(out).icc_profile == icc and images.read_parameters(out) == {"a": 1}


def test_grey_or_broken_icc_profile_is_left_out_with_a_note(tmp_path):
    grey = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()  # not RGB
    Image.new("RGB", (4, 4)).save(tmp_path / "lab.png", icc_profile=grey)
    img = images.read_image(tmp_path / "lab.png")
    assert img.icc_profile is None and len(img.notes) == 1 and "Lab colour" in img.notes[0] and "lab.png" in img.notes[0]
    Image.new("RGB", (4, 4)).save(tmp_path / "junk.png", icc_profile=b"not a profile" * 20)
    img = images.read_image(tmp_path / "junk.png")
    assert img.icc_profile is None and "junk.png: its ICC profile is unreadable" in img.notes[0]


def test_exif_orientation_at_every_depth_and_format(tmp_path):
    """All eight orientations: 8-bit PNG and TIFF through Pillow, 16-bit PNG (eXIf before or after the image data)
    and 16-bit TIFF: the same pixels as Pillow's exif_transpose of the 8-bit image; image_size agrees."""
    a8 = np.random.default_rng(3).integers(0, 256, (5, 8, 3)).astype(np.uint8)
    a16 = a8.astype(np.uint16) * 257
    plain = images.encode_png(a16)
    for o in range(1, 9):
        with Image.open(io.BytesIO(_png8_with_exif(a8, o))) as im:
            want = images.pil_to_tensor(ImageOps.exif_transpose(im))
        files = {"8.png": _png8_with_exif(a8, o), "16.png": with_chunk(plain, b"eXIf", exif_body(o)),
                 "16-late.png": with_chunk(plain, b"eXIf", exif_body(o), before=b"IEND")}
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
        for name, a in (("16.tif", a16), ("8.tif", a8)):
            tifffile.imwrite(tmp_path / name, a, photometric="rgb", extratags=[(274, 3, 1, o, False)])
        for name in (*files, "16.tif", "8.tif"):
            img = images.read_image(tmp_path / name)
            assert torch.allclose(img.rgb, want, atol=1e-6), (o, name)
            if name != "16-late.png":  # past the image data: only a decode finds it
                assert images.image_size(tmp_path / name) == tuple(want.shape[1:]), (o, name)


def _png8_with_exif(a8: np.ndarray, orientation: int) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a8).save(buf, format="PNG", exif=exif.tobytes())
    return buf.getvalue()


def test_odd_orientation_values_are_ignored(tmp_path):
    """Orientation 0, 9 or the text "6": taken as 1 (shown as stored), as Pillow's exif_transpose does."""
    a16 = (np.arange(5 * 8 * 3).reshape(5, 8, 3) * 100).astype(np.uint16)
    entries = [(3, 1, struct.pack(">HH", 0, 0)), (3, 1, struct.pack(">HH", 9, 0)), (2, 2, b"6\0\0\0")]
    for kind, count, value in entries:  # a big-endian TIFF structure with one entry: tag 0x0112
        body = b"MM\0*" + struct.pack(">IHHHI", 8, 1, 0x0112, kind, count) + value + struct.pack(">I", 0)
        p = tmp_path / "odd.png"
        p.write_bytes(with_chunk(images.encode_png(a16), b"eXIf", body))
        assert images.read_image(p).size == (5, 8) and images.image_size(p) == (5, 8)


def test_load_and_save_png_keep_16_bits(tmp_path):
    x = torch.rand(4, 6, 5, generator=torch.Generator().manual_seed(4))
    p = images.save_png(x, tmp_path / "x.png", {"seed": 1}, bits=16)
    back = images.load_image(p, alpha=True)
    assert back.shape == (4, 6, 5) and (back - x).abs().max() <= 0.5 / 65535 + 1e-7
    assert images.read_png_parameters(p) == {"seed": 1}


def test_tampered_parameters_read_as_none(tmp_path):
    for text in ("[1, 2]", "{not json", '"a string"', "[" * 100000):
        p = tmp_path / "t.png"
        Image.new("RGB", (2, 2)).save(p, pnginfo=_info(text))
        assert images.read_parameters(p) is None


def _info(text: str):
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_itxt("parameters", text)
    return info


def test_compressed_16_bit_tiff_keeps_16_bits(tmp_path):
    """Deflate-compressed and planar 16-bit colour TIFFs (read at 8 bits before tifffile) keep 16 bits."""
    a = (np.random.default_rng(5).random((6, 7, 3)) * 65535).astype(np.uint16)
    tifffile.imwrite(tmp_path / "deflate.tif", a, photometric="rgb", compression="zlib")
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(a, 2, 0), photometric="rgb", planarconfig="separate")
    for name in ("deflate.tif", "planar.tif"):
        img = images.read_image(tmp_path / name)
        assert img.bits == 16 and img.notes == [], name
        assert torch.equal(img.rgb, images.from_uint16(a)), name
