"""sdup.images against damaged and crafted files and failing disks: one ``UpscaleIOError`` line naming the file,
nothing else on stderr, never a traceback, never a partial output."""
from __future__ import annotations

import errno
import random
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch

from sdup import images

ROOT = Path(__file__).resolve().parents[1]
BOMB = 64 << 20  # 64 MiB of zeros: about 64 KiB compressed


def chunk(kind: bytes, body: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF if crc is None else crc
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png(w=8, h=6, depth=8, ctype=2, before=(), idat=None, after=(), ihdr=None) -> bytes:
    """A PNG of zeros, with ``before`` / ``after`` chunks around the image data."""
    if idat is None:
        bpp = {0: 1, 2: 3, 4: 2, 6: 4}.get(ctype, 3) * max(depth, 8) // 8
        idat = zlib.compress(bytes(h * (1 + w * bpp)))
    head = chunk(b"IHDR", ihdr if ihdr is not None else struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + head + b"".join(before) + chunk(b"IDAT", idat) + b"".join(after) + chunk(b"IEND", b"")


def zbomb() -> bytes:
    return zlib.compress(bytes(BOMB), 9)


FAILS = {  # each at 8 and 16 bits: refused in one line
    "bad CRC in an ancillary chunk": lambda d: png(depth=d, before=[chunk(b"tEXt", b"k\0v", crc=1)]),
    "chunk length 2^31 - 1": lambda d: png(depth=d, before=[struct.pack(">I", 0x7FFFFFFF) + b"tEXt" + b"abc"]),
    "iCCP bomb": lambda d: png(depth=d, before=[chunk(b"iCCP", b"p\0\0" + zbomb())]),
    "zTXt bomb": lambda d: png(depth=d, before=[chunk(b"zTXt", b"k\0\0" + zbomb())]),
    "iTXt bomb": lambda d: png(depth=d, before=[chunk(b"iTXt", b"parameters\0\1\0\0\0" + zbomb())]),
    "IDAT not zlib": lambda d: png(depth=d, idat=b"\x01\x02" * 50),
    "no image data": lambda d: png(depth=d)[:33] + chunk(b"IEND", b""),
    "IHDR 0 x 0": lambda d: png(0, 0, depth=d),
    "IHDR 100000 x 100000": lambda d: png(100000, 100000, depth=d, idat=b""),
    "IHDR colour type 7": lambda d: png(depth=d, ctype=7),
    "IHDR short": lambda d: png(depth=d, ihdr=b"\0\0\0\x08\0\0"),
    "truncated in the header": lambda d: png(depth=d)[:20],
    "truncated in the image data": lambda d: png(depth=d, idat=zlib.compress(random.Random(1).randbytes(300)))[:80],
    "16-bit IDAT bomb": lambda d: png(depth=16, idat=zbomb()),  # pypng would inflate it whole
    "a second IHDR": lambda d: png(depth=d, before=[chunk(b"IHDR", struct.pack(">IIBBBBB", 99, 99, 16, 6, 0, 0, 0))]),
}
DECODE_ONLY = {"IDAT not zlib", "16-bit IDAT bomb", "truncated in the image data", "no image data", "a second IHDR"}
READS = {  # each at 8 and 16 bits: read, the odd chunk ignored
    "unknown ancillary chunk": lambda d: png(depth=d, before=[chunk(b"zzZz", b"\0" * 100)]),
    "iCCP not zlib": lambda d: png(depth=d, before=[chunk(b"iCCP", b"p\0\0not zlib at all")]),
    "text past the image data": lambda d: png(depth=d, after=[chunk(b"tEXt", b"k\0v")]),
    "8-bit IDAT bomb": lambda d: png(depth=8, idat=zbomb()),  # Pillow inflates what the image needs, no more
}


def assert_one_line(e: images.UpscaleIOError, path: Path):
    assert "\n" not in str(e) and str(e).startswith(str(path)), str(e)


@pytest.mark.parametrize("depth", [8, 16])
@pytest.mark.parametrize("case", sorted(FAILS))
def test_crafted_png_is_one_line(case, depth, tmp_path, capfd):
    p = tmp_path / "crafted.png"
    p.write_bytes(FAILS[case](depth))
    for read in (images.read_image, images.image_size):
        if read is images.image_size and case in DECODE_ONLY:
            continue  # the header is fine: only a decode finds these
        with pytest.raises(images.UpscaleIOError) as e:
            read(p)
        assert_one_line(e.value, p)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("depth", [8, 16])
@pytest.mark.parametrize("case", sorted(READS))
def test_odd_but_harmless_chunks_are_ignored(case, depth, tmp_path, capfd):
    p = tmp_path / "odd.png"
    p.write_bytes(READS[case](depth))
    img = images.read_image(p)
    assert img.size == (6, 8) and img.bits == (8 if "8-bit" in case else depth) and img.icc_profile is None
    assert capfd.readouterr().err == ""


def test_mutated_files_never_raise_anything_else(tmp_path, capfd):
    """Bytes flipped, cut, inserted and lengths set to extremes in small files of every format and depth: each
    read succeeds or ends in one UpscaleIOError line, and the decoders print nothing (libtiff, tifffile, Pillow)."""
    x, a = torch.rand(3, 12, 10, generator=torch.Generator().manual_seed(0)), torch.rand(1, 12, 10)
    seeds = []
    for name, bits in (("s.png", 8), ("s16.png", 16), ("s16.tif", 16), ("s.tif", 8), ("s.jpg", 8), ("s.webp", 8)):
        out = images.write_image(tmp_path / name, x, a, bits=bits, parameters={"a": 1}, warn=lambda m: None)
        seeds.append(out.read_bytes())
    rng = random.Random(0)
    for i in range(240):
        data = bytearray(seeds[i % len(seeds)])
        for _ in range(rng.randint(1, 4)):
            pos, op = rng.randrange(len(data)), rng.random()
            if op < 0.5:
                data[pos] = rng.randrange(256)
            elif op < 0.7:
                del data[pos:pos + rng.randint(1, 40)]
            elif op < 0.85:
                data[pos:pos] = rng.randbytes(rng.randint(1, 20))
            else:
                data[pos:pos + 4] = struct.pack(">I", rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 24]))
        p = tmp_path / f"m{i % 7}.bin"
        p.write_bytes(bytes(data))
        for read in (images.read_image, images.image_size, images.read_parameters):
            try:
                read(p)
            except images.UpscaleIOError as e:
                assert_one_line(e, p)
    assert capfd.readouterr().err == ""


WRITER = textwrap.dedent("""
    import resource, sys, torch
    from sdup import images
    resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))  # Python ignores SIGXFSZ: writes fail with EFBIG
    x = torch.rand(3, 64, 64)
    for name, bits in (("o.tif", 8), ("o16.tif", 16), ("o.png", 8), ("o16.png", 16), ("o.jpg", 8), ("o.webp", 8)):
        try:
            images.write_image(sys.argv[1] + "/" + name, x, bits=bits, parameters={"a": 1}, warn=lambda m: None)
        except images.ImageWriteError as e:
            print(e)
""")


def test_file_size_limit_names_the_output_and_leaves_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-c", WRITER, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                       timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and r.stderr == "", r.stderr  # no libtiff lines
    lines = r.stdout.splitlines()
    names = ["o.tif", "o16.tif", "o.png", "o16.png", "o.jpg", "o.webp"]
    assert len(lines) == len(names), r.stdout
    for line, name in zip(lines, names):
        assert line == f"{tmp_path / name}: cannot write the image (File too large)", line
    assert list(tmp_path.iterdir()) == []


def test_full_disk_and_a_folder_in_the_way(tmp_path, monkeypatch):
    (tmp_path / "o.png").mkdir()
    with pytest.raises(images.ImageWriteError, match=r"o\.png: is a folder, cannot write the image there$"):
        images.write_image(tmp_path / "o.png", torch.rand(3, 4, 4))

    def full(self, data):
        with open(self, "wb") as f:
            f.write(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_bytes", full)
    for name in ("o.tif", "o.jpg"):
        with pytest.raises(OSError) as e:  # an ImageWriteError is an OSError and an UpscaleIOError
            images.write_image(tmp_path / name, torch.rand(3, 4, 4))
        assert isinstance(e.value, images.UpscaleIOError)
        assert str(e.value) == f"{tmp_path / name}: cannot write the image (No space left on device)"
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]
