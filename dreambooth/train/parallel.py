"""Data-parallel training over several processes (one per GPU), started by ``accelerate launch`` or ``torchrun``.

Every process holds the whole model and takes its own share of each step's images; before each optimizer step
the gradients are averaged over the processes, so every copy of the weights takes the same update (the rounding
stream of bf16 weights is seeded alike everywhere, so bf16 copies stay bit-identical too). Process 0 alone
prepares the shared files (class images, latent cache), reports, saves and samples; the others
wait for its preparation, then find everything in place. One process (no launcher) is the plain path: nothing
here does anything then.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

BUCKET_ELEMENTS = 1 << 25
"""Gradients smaller than this travel together, gathered into buffers of about this many elements."""

TIMEOUT = datetime.timedelta(hours=2)
"""How long a process waits for the others (process 0 may convert the model and draw hundreds of class images
while they wait; NCCL's own default, 10 minutes, is too short for that)."""


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

    def average_(self, tensors: Iterable[torch.Tensor], bucket: int = BUCKET_ELEMENTS) -> None:
        """Replace each tensor by its mean over the processes: a large one in place, small ones of one dtype
        gathered into buckets of up to ``bucket`` elements (one collective call each, little extra memory)."""
        if not self.active:
            return
        pending: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in tensors:
            if tensor.numel() >= bucket:
                self._average_bucket([tensor])
                continue
            group = pending.setdefault(tensor.dtype, [])
            group.append(tensor)
            if sum(t.numel() for t in group) >= bucket:
                self._average_bucket(group)
                pending[tensor.dtype] = []
        for group in pending.values():
            if group:
                self._average_bucket(group)

    def _average_bucket(self, group: list[torch.Tensor]) -> None:
        flat = group[0] if len(group) == 1 and group[0].is_contiguous() else torch.cat([t.reshape(-1) for t in group])
        torch.distributed.all_reduce(flat)
        flat.div_(self.world)
        if flat is group[0]:
            return
        offset = 0
        for tensor in group:
            tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
            offset += tensor.numel()

    def identical(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is the same, bit for bit, in every process."""
        if not self.active:
            return True
        high, low = value.clone(), value.clone()
        torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
        return bool(torch.equal(high, low))

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
        torch.distributed.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=TIMEOUT)
    return Parallel(rank=rank, world=world, local_rank=local_rank)


def leave_process_group() -> None:
    """Leave the process group :func:`from_environment` joined, if any (at the end of a run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
