"""AdamW with bitsandbytes' block-wise 8-bit moments over a flat buffer, bf16 weights stochastically rounded.

Memory per weight: 2 bytes (bf16) + 2 bytes (two 8-bit moments) + a float per 256 weights. bitsandbytes rounds
its result to the parameter's dtype to nearest, which loses lr-sized updates on bf16 weights, so each range is
updated on an fp32 copy and written back with :func:`copy_stochastic_`.
"""

from __future__ import annotations

import torch

from .flat import FlatParameters
from .rounding import copy_stochastic_

BLOCK = 256
CHUNK = 32 * 1024 * 1024  # elements per update in step(): a multiple of BLOCK


class FlatAdamW8bit:
    """8-bit AdamW on a :class:`FlatParameters` built with ``align`` a multiple of 256. Needs bitsandbytes + CUDA."""

    def __init__(
        self,
        flat: FlatParameters,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        import bitsandbytes.functional as bnbf

        if flat.numel % BLOCK:
            raise ValueError("FlatAdamW8bit needs FlatParameters aligned to 256 elements.")
        self._bnbf = bnbf
        self.flat = flat
        device = flat.data.device
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.step_count = 0
        self.state1 = torch.zeros(flat.numel, dtype=torch.uint8, device=device)
        self.state2 = torch.zeros(flat.numel, dtype=torch.uint8, device=device)
        self.absmax1 = torch.zeros(flat.numel // BLOCK, dtype=torch.float32, device=device)
        self.absmax2 = torch.zeros(flat.numel // BLOCK, dtype=torch.float32, device=device)
        self.qmap1 = bnbf.create_dynamic_map(signed=True).to(device)
        self.qmap2 = bnbf.create_dynamic_map(signed=False).to(device)

    def set_lr(self, lr: float) -> None:
        """Change the learning rate (a host number: bitsandbytes takes it as a kernel argument)."""
        self.lr = lr

    def begin_step(self) -> None:
        """Advance the step count before the ranges of this step are updated."""
        self.step_count += 1

    def update_range(self, start: int, stop: int, grad: torch.Tensor, grad_scale: torch.Tensor | None = None) -> None:
        """Update ``flat.data[start:stop]`` (``start``, ``stop`` multiples of 256) from fp32/bf16 ``grad``."""
        assert start % BLOCK == 0 and stop % BLOCK == 0
        weights = self.flat.data[start:stop]
        p32 = weights.float()
        g32 = grad.float() if grad_scale is None else grad.float() * grad_scale
        self._bnbf.optimizer_update_8bit_blockwise(
            "adam",
            g32,
            p32,
            self.state1[start:stop],
            self.state2[start:stop],
            self.betas[0],
            self.betas[1],
            0.0,
            0.0,
            self.eps,
            self.step_count,
            self.lr,
            self.qmap1,
            self.qmap2,
            self.absmax1[start // BLOCK : stop // BLOCK],
            self.absmax2[start // BLOCK : stop // BLOCK],
            weight_decay=self.weight_decay,
        )
        copy_stochastic_(weights, p32)

    @torch.no_grad()
    def step(self) -> None:
        """One step over the whole flat gradient (no clipping), then zero it."""
        assert self.flat.grad is not None, "FlatAdamW8bit.step needs FlatParameters(with_grad_buffer=True)"
        self.begin_step()
        for start in range(0, self.flat.numel, CHUNK):  # fp32 copies of one chunk at a time, not 2 × 3.4 GB
            stop = min(start + CHUNK, self.flat.numel)
            self.update_range(start, stop, self.flat.grad[start:stop])
        self.flat.zero_grad()

    def state_dict(self) -> dict:
        """Quantized moments, their scales and the step count (for resume)."""
        return {
            "state1": self.state1,
            "state2": self.state2,
            "absmax1": self.absmax1,
            "absmax2": self.absmax2,
            "step": self.step_count,
            "lr": self.lr,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        for name in ("state1", "state2", "absmax1", "absmax2"):
            getattr(self, name).copy_(state[name])
        self.step_count, self.lr = int(state["step"]), float(state["lr"])
