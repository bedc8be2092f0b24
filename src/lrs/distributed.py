"""Data-parallel runs: which share of the work this process owns, and waiting for the others.

``torchrun --nproc_per_node N -m lrs.cli collect ...`` (or ``accelerate launch --num_processes N -m lrs.cli ...``
on GPUs; both set WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous address) starts N copies of the command;
each takes every N-th batch (batches and their seeds are those of a one-process run), writes its own shards
and its own partial manifest, and the first process merges them into the same files one process writes.
``lrs eval`` works the same way: each process appends its batches to ``<name>.partial.rank{R}.jsonl`` and
the first one writes ``<name>.jsonl`` + ``<name>.summary.json`` from all of them.
Without a launcher nothing here initialises anything: one process owns everything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class Share:
    """This process's place among ``world`` processes."""

    rank: int = 0
    world: int = 1

    def owns(self, batch: int) -> bool:
        """Whether batch number ``batch`` is this process's to do (round robin)."""
        return batch % self.world == self.rank

    @property
    def main(self) -> bool:
        return self.rank == 0


def share() -> Share:
    """This process's share, from the launcher's environment (accelerate, torchrun: WORLD_SIZE and RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Share()
    return Share(int(os.environ.get("RANK", "0")), world)


#: how long a process waits for the others at a barrier: a resumed run can leave one process most of the work
BARRIER_TIMEOUT = timedelta(days=7)


def barrier(s: Share) -> None:
    """Wait until every process reaches this point (a no-op for one process).

    The first barrier sets up the process group, so processes that finish their share early wait there for the
    slowest one (up to :data:`BARRIER_TIMEOUT`, not torch's default 30 minutes)."""
    if s.world <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():  # gloo: a barrier needs no GPU, and it works on every machine
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    dist.barrier()
