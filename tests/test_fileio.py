"""sdup.fileio.atomic_write: whole files or nothing, one temporary file per writer, last complete writer wins."""
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdup.fileio import atomic_write, can_create, make_folders, remove_empty

ROOT = Path(__file__).resolve().parents[1]

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sdup.fileio import atomic_write
    target, tag, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    start = Path(sys.argv[4])
    while not start.exists():           # both writers begin together
        time.sleep(0.001)

    def write(tmp):
        with open(tmp, "w") as f:
            for i in range(12):          # a slow write in pieces, as an image encoder does
                f.write(f"{tag} {i}\\n")
                f.flush()
                time.sleep(0.0005)

    for _ in range(rounds):
        atomic_write(target, write)
    print("ok")
""")


def test_two_processes_never_mix_one_file(tmp_path):
    target, start = tmp_path / "out.txt", tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), tag, "40", str(start)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for tag in "AB"]
    start.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-500:] for r in results]
    lines = target.read_text().splitlines()
    tags = {line.split()[0] for line in lines}
    assert len(lines) == 12 and len(tags) == 1, lines           # one writer's complete file, never a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "out.txt"]  # no temporary file left


def test_failed_or_interrupted_write_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def failing(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_folders_are_swapped_whole(tmp_path):
    target = tmp_path / "sub" / "model"

    def fill(tag):
        def write(tmp):
            (tmp / "unet").mkdir()
            (tmp / "unet" / "w.txt").write_text(tag)
        return write

    atomic_write(target, fill("one"), folder=True)
    atomic_write(target, fill("two"), folder=True)
    assert (target / "unet" / "w.txt").read_text() == "two"

    def broken(tmp):
        (tmp / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken, folder=True)
    assert (target / "unet" / "w.txt").read_text() == "two" and [p.name for p in target.parent.iterdir()] == ["model"]


def test_can_create(tmp_path):
    can_create(tmp_path / "new" / "deeper" / "o.png")       # nothing is created (folders come with the write)
    can_create(tmp_path / "o.png")
    assert list(tmp_path.iterdir()) == []
    made = make_folders(tmp_path / "new" / "deeper")
    assert made == [tmp_path / "new", tmp_path / "new" / "deeper"]
    remove_empty(made)
    assert list(tmp_path.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError):
        can_create(blocker / "o.png")                        # a file where a folder should be
    (tmp_path / "o.png").mkdir()
    with pytest.raises(IsADirectoryError):
        can_create(tmp_path / "o.png")                       # a folder where the file should be


def test_outputs_get_the_usual_file_mode(tmp_path):
    """safetensors creates its files 0600; atomic_write gives every file it writes (a folder's too) the mode a plain
    open() would: 0666 less the umask."""
    import torch
    from safetensors.torch import save_file

    from sdup.fileio import file_mode
    one = atomic_write(tmp_path / "w.safetensors", lambda p: save_file({"a": torch.zeros(2)}, str(p)))
    def fill(folder):
        (folder / "sub").mkdir()
        save_file({"a": torch.zeros(2)}, str(folder / "sub" / "x.safetensors"))
    tree = atomic_write(tmp_path / "folder", fill, folder=True)
    umask = os.umask(0)
    os.umask(umask)
    assert file_mode() == 0o666 & ~umask
    for f in (one, tree / "sub" / "x.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == file_mode(), oct(f.stat().st_mode)
