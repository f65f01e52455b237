"""Multi-process runs under ``torchrun``: which rank runs what, and how the ranks agree.

Rank 0 runs every stage as in a single-process run (cache, tracking, commits). Stages that
declare ``distributed=True`` (train) run on every rank together; the other ranks write their
outputs nowhere and track nothing. After each stage rank 0 tells the others whether it
succeeded, so a failure on rank 0 stops every rank instead of leaving them waiting.
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
        if self.world_size == 1:
            return ok
        import torch

        flag = torch.tensor([int(ok)])
        torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())


def collective_from_environment(timeout_hours: float = 6.0) -> Collective:
    """Join the process group ``torchrun`` describes in the environment, if any.

    ``WORLD_SIZE`` > 1 starts ``torch.distributed`` (NCCL when CUDA is available, else gloo)
    from the ``torchrun`` variables; otherwise this is a plain single-process run. The
    timeout bounds how long ranks wait for rank 0 to finish a non-distributed stage (ingest).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Collective()
    import torch

    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
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
