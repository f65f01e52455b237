"""The one home of ``torch.distributed`` helpers: join the group, agree, average, leave.

Used by the runner (ranks agree after each stage, see ``runner.distributed``) and by the
training loop (early stopping, loss averaged over ranks, rank 0's clock for a minutes budget).
torch is imported only when a process group is in use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class Collective:
    """A process's place in a multi-process run (``world_size`` 1: a plain run)."""

    rank: int = 0
    world_size: int = 1

    def agree(self, ok: bool) -> bool:
        """Rank 0's ``ok`` as seen by every rank (a broadcast; no-op in a plain run)."""
        return broadcast_flag(ok, self.world_size)


def current() -> Collective:
    """The place of this process in the initialised process group; a plain run without one."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Collective(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return Collective()


def broadcast_flag(flag: bool, world_size: int) -> bool:
    """Rank 0's ``flag`` on every rank (no-op when ``world_size`` is 1)."""
    return bool(broadcast_value(float(flag), world_size))


def broadcast_value(value: float, world_size: int) -> float:
    """Rank 0's ``value`` on every rank (``value`` itself when ``world_size`` is 1)."""
    if world_size == 1:
        return value
    import torch

    held = torch.tensor([value], dtype=torch.float64)
    torch.distributed.broadcast(held, src=0)
    return float(held.item())


def broadcast_object(value: object, world_size: int) -> object:
    """Rank 0's ``value`` (picklable) on every rank (``value`` itself when ``world_size`` is 1)."""
    if world_size == 1:
        return value
    import torch

    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def mean_over_ranks(value: float, world_size: int) -> float:
    """The mean of ``value`` over all ranks (``value`` itself when ``world_size`` is 1)."""
    if world_size == 1:
        return value
    import torch

    total = torch.tensor([value])
    torch.distributed.all_reduce(total)
    return float(total.item()) / world_size


def collective_from_environment(timeout_hours: float = 6.0) -> Collective:
    """Join the process group ``torchrun`` describes in the environment, if any.

    ``WORLD_SIZE`` > 1 starts ``torch.distributed`` from the ``torchrun`` variables; otherwise
    this is a plain single-process run. With CUDA the group has two backends: NCCL for the
    gradients (CUDA tensors) and gloo for the ranks' agreements, which travel as CPU tensors
    (NCCL alone refuses them: "No backend type associated with device type cpu"). The
    timeout bounds how long ranks wait for rank 0 to finish a non-distributed stage (ingest).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Collective()
    import torch

    if not torch.distributed.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, timeout=timedelta(hours=timeout_hours))
    return Collective(torch.distributed.get_rank(), torch.distributed.get_world_size())


def leave(collective: Collective, *, together: bool) -> None:
    """Leave the process group joined by ``collective_from_environment``.

    ``together`` (the run ended normally on this rank) waits for the other ranks first:
    gloo aborts a process whose peer tears down mid-exchange. After a failure there is no
    waiting, since the peers may never arrive; ``torchrun`` stops them.
    """
    if collective.world_size > 1:
        import torch

        if together:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
