"""Data-parallel training over several processes (one per GPU), started by ``accelerate launch`` or ``torchrun``.

Every process holds the whole model and takes its own share of each step's images; before each optimizer step
the gradients are averaged over the processes, so every copy of the weights takes the same update (the rounding
stream of bf16 weights is seeded alike everywhere, so bf16 copies stay bit-identical too). Process 0 alone
prepares the shared files (working copy, class images, latent cache), reports, saves and samples; the others
wait for its preparation, then find everything in place. One process (no launcher) is the plain path: nothing
here does anything then.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Parallel:
    """Where this process stands among the launched ones."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that reports, saves and samples."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process trains."""
        return self.world > 1

    def barrier(self) -> None:
        """Wait until every process is here."""
        if self.active:
            torch.distributed.barrier()

    def average_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the processes, in one collective call per dtype."""
        if not self.active:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for group in by_dtype.values():
            if len(group) == 1:
                flat = group[0]
                torch.distributed.all_reduce(flat)
                flat.div_(self.world)
                continue
            flat = torch.cat([t.reshape(-1) for t in group])
            torch.distributed.all_reduce(flat)
            flat.div_(self.world)
            offset = 0
            for tensor in group:
                tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
                offset += tensor.numel()

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process when ``flag`` is true on any (so all stop at the same step)."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())


def from_environment(device_type: str) -> Parallel:
    """The launcher's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; joins the process group when there are several
    (NCCL on CUDA, gloo on the CPU) and makes the process's own GPU the current one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Parallel()
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Parallel(rank=rank, world=world, local_rank=local_rank)


def leave_process_group() -> None:
    """Leave the process group :func:`from_environment` joined, if any (at the end of a run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
