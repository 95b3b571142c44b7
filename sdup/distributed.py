"""One job over several processes or hosts, on ``torch.distributed`` as launched by ``torchrun``.

    torchrun --nproc-per-node 2 scripts/upscale.py photos/ -o out/ ...      # or --nnodes / --rdzv-endpoint

``from_environment()`` reads what torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR / MASTER_PORT) and joins
the group: gloo on the CPU, nccl on CUDA with one device per local rank. Without those variables, or with a world of
one, it returns None and joins nothing: a plain run stays a single process.

Every collective here carries each rank's status with its data (``exchange``): a rank whose work raised sends
its error instead of its result, so every rank stops with the same one line naming the rank that failed, instead
of waiting forever for a result that never comes. A rank that dies outright is caught by the group's timeout
(``SDUP_DIST_TIMEOUT`` seconds, default 600).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600


class RankFailed(RuntimeError):
    """Another rank (or this one) failed; the message names it."""


@dataclass
class Group:
    """This process's place in the job. ``group`` is the torch.distributed process group (None: the default)."""
    rank: int
    world_size: int
    local_rank: int = 0
    device: str = "cpu"
    group: Any = None
    backend: str = "gloo"  # nccl moves CUDA tensors only; gloo moves CPU tensors (and CUDA ones through the host)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment(timeout_s: float | None = None) -> Group | None:
    """Join the group torchrun describes in the environment, or None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    timeout = timedelta(seconds=timeout_s or float(os.environ.get("SDUP_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    backend = os.environ.get("SDUP_DIST_BACKEND", "").strip().lower() or None
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"SDUP_DIST_BACKEND must be gloo or nccl, got {backend!r}")
    device = "cpu"
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if local >= n and backend != "gloo":  # nccl needs a device of its own per rank
            raise ValueError(f"rank {rank}: LOCAL_RANK {local} but only {n} CUDA device(s) visible; start at most "
                             f"{n} processes per node (or set SDUP_DIST_BACKEND=gloo to share devices)")
        device = f"cuda:{local % n}"
        torch.cuda.set_device(local % n)
    backend = backend or ("nccl" if device != "cpu" else "gloo")
    if backend == "nccl" and device == "cpu":
        raise ValueError("SDUP_DIST_BACKEND=nccl needs CUDA devices; none is visible")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    return Group(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)


def shard(items: Sequence[T], group: Group | None) -> list[T]:
    """This rank's share of a sorted list: every ``world_size``-th item from its rank on (balanced, and the same
    split on every rank without communication)."""
    return list(items) if group is None else list(items[group.rank::group.world_size])


def exchange(work: Callable[[], T], group: Group | None) -> list[T]:
    """Run ``work()`` here and collect every rank's result, in rank order, on every rank. If any rank's work
    raised, every rank raises ``RankFailed`` naming the first rank that failed and its one-line error."""
    try:
        mine = ("ok", work())
    except RankFailed as e:  # a collective inside ``work`` already named the rank: passed on as it is
        mine = ("failed", str(e))
    except SystemExit as e:  # a one-line error already printed by this rank (the CLI's fail)
        mine = ("error", f"stopped with exit code {e.code}")
    except Exception as e:  # noqa: BLE001 - sent to the others, then raised here too
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        mine = ("error", f"{type(e).__name__}: {first}" if not isinstance(e, (ValueError, OSError)) else first)
    if group is None:
        results = [mine]
    else:
        import torch.distributed as dist
        results = [None] * group.world_size
        try:
            dist.all_gather_object(results, mine, group=group.group)
        except Exception as e:  # a rank that died or hung: gloo / nccl report a lost peer or a timeout
            raise _lost(group, e) from None
    for rank, (status, value) in enumerate(results):
        if status == "failed":
            raise RankFailed(value)
        if status == "error":
            raise RankFailed(f"rank {rank} failed: {value}")
    return [value for _, value in results]


def exchange_tensors(work: Callable[[], dict], group: Group | None, device=None) -> dict:
    """``exchange`` for tensors: ``work()`` returns a dict of tensors (or tuples of them) under keys no other rank
    uses; every rank gets all ranks' entries in one dict, on ``device`` (None: as they arrive, on the group's
    device with nccl, on the CPU with gloo). The keys, shapes and dtypes travel with each rank's status through
    ``exchange`` (so a failed rank stops every rank first); the tensors travel as one flat byte buffer per rank
    through ``all_gather``: GPU to GPU with nccl, no pickling. A single process gets ``work()`` itself."""
    if group is None:
        return work()
    import torch
    import torch.distributed as dist
    mine: dict = {}

    def describe():
        mine.update(work())
        return [(k, isinstance(v, torch.Tensor), [(tuple(t.shape), t.dtype) for t in _tensors(v)])
                for k, v in mine.items()]

    described = exchange(describe, group)
    comm = torch.device(group.device if group.backend == "nccl" else "cpu")
    sizes = [sum(_padded(shape, dt) for _, _, ts in d for shape, dt in ts) for d in described]
    buf = torch.zeros(max(sizes), dtype=torch.uint8, device=comm)
    at = 0
    for v in mine.values():
        for t in _tensors(v):
            n = t.numel() * t.element_size()
            buf[at:at + n] = t.detach().contiguous().reshape(-1).view(torch.uint8).to(comm)
            at += _padded(t.shape, t.dtype)
    bufs = [torch.empty_like(buf) for _ in range(group.world_size)]
    try:
        dist.all_gather(bufs, buf, group=group.group)
    except Exception as e:  # noqa: BLE001 - as in exchange: a lost peer or a timeout
        raise _lost(group, e) from None
    merged: dict = {}
    for b, d in zip(bufs, described):
        at = 0
        for key, single, shapes in d:
            ts = []
            for shape, dt in shapes:
                n = _padded(shape, dt, pad=False)
                t = b[at:at + n].view(dt).view(shape)
                ts.append(t if device is None else t.to(device))
                at += _padded(shape, dt)
            merged[key] = ts[0] if single else tuple(ts)
    return merged


def _lost(group: Group, e: Exception) -> RankFailed:
    """The one line for a collective that failed under this rank: a peer gone or the timeout passed."""
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return RankFailed(f"rank {group.rank}: lost contact with the other ranks ({first})")


def _tensors(v) -> list:
    import torch
    return [v] if isinstance(v, torch.Tensor) else list(v)


def _padded(shape, dtype, pad: bool = True) -> int:
    """Bytes of a tensor in the exchange buffer, rounded up to 16 (every tensor starts aligned for any dtype)."""
    import math
    n = math.prod(shape) * dtype.itemsize
    return -(-n // 16) * 16 if pad else n


_current: list = [None]


@contextlib.contextmanager
def using(group: Group | None):
    """Within the block, ``current()`` is ``group``: the tile calls (``tiling.TiledModel``) and the tiled VAE decode
    of one pipeline run that were given no group of their own split their work over it (``job.run`` enters it)."""
    saved = _current[0]
    _current[0] = group
    try:
        yield group
    finally:
        _current[0] = saved


def current() -> Group | None:
    """The group set by the innermost ``using`` block (None outside one: a single process)."""
    return _current[0]


def close(group: Group | None) -> None:
    """Leave the group together: a barrier, then every rank closes its connections (a rank that exits while another
    still holds the group open can make the other's gloo abort)."""
    if group is not None:
        import torch.distributed as dist
        if dist.is_initialized():
            try:
                dist.barrier(group=group.group)
            except Exception:  # noqa: BLE001 - a peer already gone: nothing left to wait for
                pass
            dist.destroy_process_group()
