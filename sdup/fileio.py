"""Whole files or nothing: every file or folder sdup writes (images, latents, checkpoints, converted folders) goes
through ``atomic_write``.

The content is written under a temporary name that belongs to this one call (``.NAME.<pid>-<random>.partial``, in the
destination's folder, so the final rename stays on one file system) and renamed onto the destination at the end.
So a reader never sees a half-written file, an interrupted write leaves nothing behind, and two processes writing
the same path never share a temporary file: each rename puts one writer's complete output in place, and the last
writer to finish wins.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import os
import shutil
import signal
import sys
import threading
import uuid
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator

try:
    import fcntl
except ImportError:  # no flock: no claims (each run does all its outputs)
    fcntl = None


def temporary_name(path: Path) -> Path:
    """A sibling name no other writer uses (the process id and 48 random bits)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.partial")


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink(missing_ok=True)


@lru_cache(maxsize=1)
def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0666 less the process's umask (read once)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _usual_modes(tmp: Path, folder: bool) -> None:
    """Give the written files ``file_mode()``: some writers create theirs 0600 (safetensors), which other users of
    the output folder then cannot read."""
    for p in (q for q in tmp.rglob("*") if q.is_file()) if folder else [tmp]:
        os.chmod(p, file_mode())


def atomic_write(path: str | Path, write: Callable[[Path], Any], *, folder: bool = False) -> Path:
    """Call ``write(tmp)`` on a fresh temporary name next to ``path``, then rename it onto ``path``; the files get
    the mode a plain ``open`` would give them (``file_mode``).

    ``folder=True``: ``tmp`` is an empty folder to fill; an existing folder at ``path`` is swapped out and removed
    only once the new one is in place. On any error or interruption (KeyboardInterrupt, or SystemExit from a
    SIGTERM handler such as the CLI's) the temporary file or folder is removed and the exception propagates."""
    path = Path(path)
    tmp = temporary_name(path)
    old = None
    try:
        if folder:
            tmp.mkdir(parents=True)
        write(tmp)
        _usual_modes(tmp, folder)
        if folder and path.exists():
            old = temporary_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        if old is not None and not path.exists():
            os.replace(old, path)  # put the previous folder back
            old = None
        raise
    finally:
        if old is not None:
            _remove(old)
    return path


def remove_abandoned(path: str | Path) -> None:
    """Remove the temporary files of ``path`` (``temporary_name``) whose writing process is gone: what a SIGKILL
    during ``atomic_write`` leaves behind, where no cleanup could run."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        pid = tmp.name[len(path.name) + 2:].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def can_create(path: str | Path) -> None:
    """Raise ``OSError`` now unless a file can be created at ``path``: the check a long job runs before any work,
    instead of failing at its final write (a folder at ``path`` fails too: the final rename could not replace it).
    Nothing is created: missing folders must be creatable in the nearest existing one (``make_folders`` makes them
    when the output is written)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    folder = path.parent
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    if folder != path.parent:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
        return
    probe = temporary_name(path)
    try:
        probe.touch(exist_ok=False)
    finally:
        probe.unlink(missing_ok=True)


def make_folders(folder: str | Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns those it created, outermost first (``remove_empty``)."""
    folder, made = Path(folder), []
    while not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    for f in reversed(made):
        f.mkdir(exist_ok=True)
    return made[::-1]


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders ``make_folders`` created that are still empty (innermost first)."""
    for f in reversed(folders):
        try:
            f.rmdir()
        except OSError:
            return


def claim_name(path: str | Path) -> Path:
    """The claim file of an output: ``.NAME.claim`` next to it."""
    path = Path(path)
    return path.with_name(f".{path.name}.claim")


def _lock(name: Path) -> int | None:
    """The claim file ``name`` created if need be and locked (``flock``, not blocking): its descriptor, or None while
    another process holds it. A holder removes the file when done, so the file locked must still be the one at
    ``name`` (else another process may already hold a new one): checked by inode, and tried again."""
    for _ in range(64):
        fd = os.open(name, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        try:
            st = os.stat(name)
        except FileNotFoundError:
            st = None
        mine = os.fstat(fd)
        if st is not None and (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    return None


def claim_holder(path: str | Path) -> str:
    """Who holds an output's claim, for a message: "process 1234", or "another process"."""
    try:
        pid = claim_name(path).read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


@contextmanager
def claim(path: str | Path) -> Iterator[bool]:
    """While working on the output ``path``: yields True once this process holds its claim, False while another
    process does (it is making that output: leave it). The claim is a lock (``flock``) on ``.NAME.claim`` next to the
    output, so it goes with its process: the claim file a killed process left is taken over by the next one; the
    holder removes the file when done, failed or interrupted. The output's folder must exist. A file system
    without locks gives no claims (True)."""
    name = claim_name(path)
    try:
        fd = _lock(name) if fcntl is not None else -1
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        name.unlink(missing_ok=True)
        fd = -1
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        if fd >= 0:
            name.unlink(missing_ok=True)
            os.close(fd)


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception, so that a write in progress cleans up as it does on Ctrl-C."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def hold_stop_signals() -> None:
    """Hold Ctrl-C and SIGTERM back (blocked: delivered, not lost, once ``run_main`` has its handlers in place): the
    first line of a program, before anything is imported."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def interrupted_line(e: BaseException) -> str:
    return f"error: {'terminated' if isinstance(e, Terminated) else 'interrupted'} (no partial output written)"


def run_main(load: Callable[[], Callable[[], int]]) -> None:
    """Exit with the code of the program ``load()`` returns, Ctrl-C and SIGTERM ending in one line
    (``interrupted_line``) and exit code 2 at any moment, start-up included. ``load`` imports the program (torch,
    numpy) with the signals held back: an import cut short leaves C extensions that cannot be imported again (an
    ImportError instead of the one line); a signal that came meanwhile is delivered as soon as it returns."""
    def terminated(signum, frame):
        raise Terminated()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, terminated)
    hold_stop_signals()
    try:
        main = load()
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        code = main()
    except KeyboardInterrupt as e:
        for s in STOP_SIGNALS:  # a second signal must not interrupt the message
            signal.signal(s, signal.SIG_IGN)
        print(interrupted_line(e), file=sys.stderr)
        code = 2
    sys.exit(code)


@contextmanager
def sigterm_as_interrupt():
    """While active (in the main thread), SIGTERM raises ``Terminated`` instead of killing the process outright,
    which would leave a temporary file behind; the previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum, frame):
        raise Terminated()
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@lru_cache(maxsize=1024)  # hex strings: the files of several diffusers folders and a folder job's inputs
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files (their relative names and contents, in sorted order): what a
    recorded run names its weights by. Cached per (path, size, mtime) within a process."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return _file_sha256(str(path), st.st_size, st.st_mtime_ns)
    h = hashlib.sha256()
    for p in sorted(p for p in path.rglob("*") if p.is_file()):
        st = p.stat()
        h.update(f"{p.relative_to(path).as_posix()}\0{_file_sha256(str(p), st.st_size, st.st_mtime_ns)}\0".encode())
    return h.hexdigest()
