"""Process-group setup for ``torchrun``: NCCL on GPUs, gloo on CPU, rank-aware helpers.

``torchrun --nproc-per-node N molmo-edge train ...`` sets RANK, WORLD_SIZE and
LOCAL_RANK; a plain ``molmo-edge train`` runs as rank 0 of 1 without a process group.
Every rank builds the same global batch from (seed, step) and keeps its slice, so a
run's result does not depend on how many processes share it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, global_batch: int) -> slice:
        """The slice of a global batch this rank trains on (equal shares, rank-major)."""
        per_rank = global_batch // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group if there is one; pick cuda:LOCAL_RANK when CUDA is present."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = (
        torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if device in (None, "cuda", "cpu")
        else torch.device(device)
    )
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        log.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, dev)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
