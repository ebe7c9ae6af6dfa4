"""AdamW with block-wise 8-bit moments over a flat buffer, bf16 weights stochastically rounded.

The moments are stored as bitsandbytes stores them (Dettmers et al., 2022, "8-bit Optimizers via Block-wise
Quantization"): every block of 256 values is divided by its largest magnitude and each quotient is replaced by
the index of the nearest entry of a 256-entry *dynamic* code (a decimal exponent plus a linear fraction, so
both 1e-6 and 0.9 keep about two significant digits). Memory per weight: 2 bytes (bf16) + 2 bytes (two 8-bit
moments) + a float per 256 weights.

The update is written here in torch operations rather than calling bitsandbytes' kernel, for two reasons:
the step count and learning rate stay on the device (bitsandbytes takes them as kernel arguments, so a
captured CUDA graph would freeze them), which lets the whole training step -- forward, backward and this
update inside it -- be recorded as one CUDA graph (``step_graph.py``); and ``torch.compile`` fuses it into a
few kernels, while the same code runs (slowly) on any device, so it is tested on the CPU.
"""

from __future__ import annotations

import torch

from .adamw import CompiledUpdate, adamw_arithmetic, clip_scale
from .flat import FlatParameters
from .rounding import copy_stochastic_

BLOCK = 256
CHUNK = 32 * 1024 * 1024  # elements per update in step(): a multiple of BLOCK


def dynamic_code(signed: bool) -> torch.Tensor:
    """The 256 sorted values an 8-bit state can take, in [-1, 1] (signed) or [0, 1].

    For each decimal exponent e = -6 .. 0 the interval [0.1, 1] x 10^e is split into 2^k equal parts (k = 0..6
    signed, 1..7 unsigned: more parts for larger numbers) and their midpoints are codes, mirrored for negative
    numbers when signed; 0 and 1 complete the set. This is the layout of bitsandbytes' ``create_dynamic_map``.
    """
    values = [0.0, 1.0]
    for i in range(7):
        parts = 2 ** (i if signed else i + 1)
        edges = torch.linspace(0.1, 1.0, parts + 1, dtype=torch.float32)
        means = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        values += means + ([-m for m in means] if signed else [])
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def _midpoints(code: torch.Tensor) -> torch.Tensor:
    return (code[1:] + code[:-1]) / 2


def quantize_blocks(values: torch.Tensor, midpoints: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as uint8, per-block absmax) of ``values`` (length a multiple of 256): nearest code of value/absmax."""
    blocks = values.view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.bucketize(scaled, midpoints).to(torch.uint8).view(-1), absmax.view(-1)


def dequantize_blocks(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """fp32 values of ``codes`` (uint8, length a multiple of 256) with their blocks' ``absmax``."""
    return (code[codes.long()].view(-1, BLOCK) * absmax.view(-1, 1)).view(-1)


def adamw8bit_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state1: torch.Tensor,
    state2: torch.Tensor,
    absmax1: torch.Tensor,
    absmax2: torch.Tensor,
    code1: torch.Tensor,
    code2: torch.Tensor,
    mid1: torch.Tensor,
    mid2: torch.Tensor,
    step: torch.Tensor,
    lr: torch.Tensor,
    grad_scale: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in place on 1-D slices of a multiple of 256 elements; ``step`` (count after this step),
    ``lr`` and ``grad_scale`` are 0-d fp32 device tensors. The moments are decoded, updated in fp32, used for
    the weight update and encoded again; bf16 weights are written with stochastic rounding."""
    p, m, v = adamw_arithmetic(param.float(), grad.float() * grad_scale, dequantize_blocks(state1, absmax1, code1),
                               dequantize_blocks(state2, absmax2, code2), step, lr, beta1, beta2, eps, weight_decay)
    copy_stochastic_(param, p)
    codes1, scale1 = quantize_blocks(m, mid1)
    codes2, scale2 = quantize_blocks(v, mid2)
    state1.copy_(codes1)
    state2.copy_(codes2)
    absmax1.copy_(scale1)
    absmax2.copy_(scale2)


class FlatAdamW8bit:
    """8-bit AdamW on a :class:`FlatParameters` built with ``align`` a multiple of 256 (any device)."""

    bucket_elems = 32 * 1024 * 1024
    """Elements per bucket inside the backward pass (``backward.py``)."""

    def __init__(
        self,
        flat: FlatParameters,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        max_grad_norm: float | None = None,
        compile: bool = False,
    ) -> None:
        if flat.numel % BLOCK:
            raise ValueError("FlatAdamW8bit needs FlatParameters aligned to 256 elements.")
        self.flat = flat
        device = flat.data.device
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay, self.max_grad_norm = eps, weight_decay, max_grad_norm
        self.state1 = torch.zeros(flat.numel, dtype=torch.uint8, device=device)
        self.state2 = torch.zeros(flat.numel, dtype=torch.uint8, device=device)
        self.absmax1 = torch.zeros(flat.numel // BLOCK, dtype=torch.float32, device=device)
        self.absmax2 = torch.zeros(flat.numel // BLOCK, dtype=torch.float32, device=device)
        self.code1, self.code2 = dynamic_code(signed=True).to(device), dynamic_code(signed=False).to(device)
        self.mid1, self.mid2 = _midpoints(self.code1), _midpoints(self.code2)
        self.step_count = torch.zeros((), dtype=torch.float32, device=device)
        self.lr = torch.full((), lr, dtype=torch.float32, device=device)
        self._one = torch.ones((), dtype=torch.float32, device=device)
        self._update = CompiledUpdate(adamw8bit_update_, compile)

    def set_lr(self, lr: float) -> None:
        """Change the learning rate without a host-device sync."""
        self.lr.fill_(lr)

    def begin_step(self) -> None:
        """Advance the step count before the ranges of this step are updated."""
        self.step_count.add_(1.0)

    def update_range(self, start: int, stop: int, grad: torch.Tensor, grad_scale: torch.Tensor | None = None) -> None:
        """Update ``flat.data[start:stop]`` (``start``, ``stop`` multiples of 256) from fp32/bf16 ``grad``."""
        if start % BLOCK or stop % BLOCK:
            raise ValueError(f"8-bit ranges must start and stop on multiples of {BLOCK} ({start}, {stop}).")
        blocks = slice(start // BLOCK, stop // BLOCK)
        self._call(
            self.flat.data[start:stop], grad, self.state1[start:stop], self.state2[start:stop],
            self.absmax1[blocks], self.absmax2[blocks], self.step_count,
            self._one if grad_scale is None else grad_scale,
        )

    def rehearse(self, start: int, stop: int, grad: torch.Tensor) -> None:
        """Run the update of ``[start, stop)`` on copies (weights and state unchanged): compiles and warms the
        kernels for that size before a CUDA graph records them."""
        blocks = slice(start // BLOCK, stop // BLOCK)
        self._call(
            self.flat.data[start:stop].clone(), grad, self.state1[start:stop].clone(),
            self.state2[start:stop].clone(), self.absmax1[blocks].clone(), self.absmax2[blocks].clone(),
            self.step_count + 1, self._one,
        )

    def _call(self, param, grad, state1, state2, absmax1, absmax2, step, grad_scale) -> None:
        args = (param, grad, state1, state2, absmax1, absmax2, self.code1, self.code2, self.mid1, self.mid2,
                step, self.lr, grad_scale, self.beta1, self.beta2, self.eps, self.weight_decay)
        self._update(*args)

    @torch.no_grad()
    def step(self) -> None:
        """One step over the whole flat gradient (clipped to ``max_grad_norm`` first when set), then zero it."""
        assert self.flat.grad is not None, "FlatAdamW8bit.step needs FlatParameters(with_grad_buffer=True)"
        self.begin_step()
        scale = clip_scale(self.flat.grad, self.max_grad_norm, self._one)
        for start in range(0, self.flat.numel, CHUNK):  # fp32 copies of one chunk at a time, not 2 × 3.4 GB
            stop = min(start + CHUNK, self.flat.numel)
            self.update_range(start, stop, self.flat.grad[start:stop], scale)
        self.flat.zero_grad()

    def state_dict(self) -> dict:
        """Quantized moments, their scales, the step count and learning rate (for resume)."""
        return {
            "state1": self.state1,
            "state2": self.state2,
            "absmax1": self.absmax1,
            "absmax2": self.absmax2,
            "step": self.step_count,
            "lr": self.lr,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (also from snapshots that stored the step as a number)."""
        for name in ("state1", "state2", "absmax1", "absmax2"):
            getattr(self, name).copy_(state[name])
        self.step_count.fill_(float(state["step"]))
        self.lr.fill_(float(state["lr"]))
