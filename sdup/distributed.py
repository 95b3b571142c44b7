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
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device != "cpu" else "gloo", timeout=timeout)
    return Group(rank=rank, world_size=world, local_rank=local, device=device)


def shard(items: Sequence[T], group: Group | None) -> list[T]:
    """This rank's share of a sorted list: every ``world_size``-th item from its rank on (balanced, and the same
    split on every rank without communication)."""
    return list(items) if group is None else list(items[group.rank::group.world_size])


def exchange(work: Callable[[], T], group: Group | None) -> list[T]:
    """Run ``work()`` here and collect every rank's result, in rank order, on every rank. If any rank's work
    raised, every rank raises ``RankFailed`` naming the first rank that failed and its one-line error."""
    try:
        mine = ("ok", work())
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
            raise RankFailed(f"rank {group.rank}: lost contact with the other ranks "
                             f"({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__})") from None
    for rank, (status, value) in enumerate(results):
        if status == "error":
            raise RankFailed(f"rank {rank} failed: {value}")
    return [value for _, value in results]


def all_sum(x, group: Group | None):
    """Sum a tensor over the ranks (in place, returned); identity for a single process."""
    if group is not None:
        import torch.distributed as dist
        dist.all_reduce(x, group=group.group)
    return x


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
