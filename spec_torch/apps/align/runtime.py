"""Where the training process runs: device, rank and world size in one place, plus main-rank-only helpers.

Single-process runs use ``Runtime.detect()`` as is (rank 0 of 1). The multi-GPU launcher initialises
``torch.distributed`` before calling the pipeline; ``Runtime.detect()`` then reads rank and world size, and
everything rank-dependent in the trainer (the sampler's shard, the loss's global batch, logging, checkpoint
writes, barriers) asks this object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..._validate import resolve_device

__all__ = ["Runtime"]


@dataclass(frozen=True)
class Runtime:
    """Device and process-group position of this process.

    Attributes:
        device: where the student trains.
        rank, world_size: this process in the (initialised) ``torch.distributed`` group; 0 and 1 without one.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @classmethod
    def detect(cls, device: str | None = "auto") -> Runtime:
        """The runtime of this process: rank/world size from ``torch.distributed`` when it is initialised."""
        if dist.is_available() and dist.is_initialized():
            return cls(resolve_device(device), dist.get_rank(), dist.get_world_size())
        return cls(resolve_device(device))

    @property
    def is_main(self) -> bool:
        """True on the process that logs, prints and writes files (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every rank (no-op in a single process)."""
        if self.distributed:
            dist.barrier()
