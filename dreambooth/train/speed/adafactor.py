"""Adafactor over a flat buffer, with bf16 weights written back by stochastic rounding.

The arithmetic is transformers' ``Adafactor`` with ``scale_parameter=False, relative_step=False, warmup_init=False``
and its defaults otherwise (``beta1=None``: no first moment; ``decay_rate=-0.8``; ``clip_threshold=1.0``;
``eps=(1e-30, 1e-3)``), as kohya's SDXL trainer runs it, done in fp32 whatever the storage dtype. For a parameter of
shape ``(..., R, C)`` (two dimensions or more) the second moment is factored as transformers factors it: over its
last two dimensions, every index of the leading ones a separate ``R x C`` matrix with ``R`` row and ``C`` column
means. A linear weight ``(out, in)`` keeps ``out + in`` numbers; a ``3x3`` convolution kernel ``(out, in, 3, 3)``
keeps ``out * in * 6`` (two thirds of its size), a ``1x1`` one twice its size. One-dimensional parameters keep a
full second moment. For SDXL's UNet that is 0.98 GB of fp32 state for 2.57 G weights (AdamW: 20.5 GB; 8-bit: 5.1).

One step of a parameter ``p`` with gradient ``g`` (step count ``t``, learning rate ``lr``):
``beta = 1 - t^-0.8``; ``r = beta*r + (1-beta)*mean_C(g^2+1e-30)``, ``c`` the same over ``R``;
``u = g / sqrt(r/mean_R(r) * c)``; ``u /= max(1, rms(u) / clip_threshold)``; ``p = p - lr*weight_decay*p - lr*u``.

Each parameter is handled as a contiguous 4-D view ``(A, R, C, D)`` of its slice of the flat buffer: its memory
order, where ``R`` and ``C`` are its last two dimensions and ``A``, ``D`` the products of the leading dimensions
stored before and after them (``D`` is 1 for contiguous tensors; a channels-last kernel ``(out, in, kh, kw)`` is
``(out, kh, kw, in)`` in memory). So the update reads the weights and the gradient in place whatever the layout,
and compiles to one small set of kernels per shape kind. The step count, learning rate and clipping factor live on
the device: the update can be recorded in a CUDA graph (``step_graph.py``).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from .adamw import CompiledUpdate, clip_scale
from .flat import FlatParameters
from .rounding import copy_stochastic_


def factored_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    beta2t: torch.Tensor,
    lr: torch.Tensor,
    grad_scale: torch.Tensor,
    eps: float,
    clip_threshold: float,
    weight_decay: float,
) -> None:
    """One Adafactor step in place on a parameter seen as ``(A, R, C, D)`` with row statistics ``(A, R, D)`` and
    column statistics ``(A, C, D)``; ``beta2t``, ``lr`` and ``grad_scale`` are 0-d fp32 device tensors. bf16
    ``param`` is written with stochastic rounding, fp32 exactly. Uncompiled, at most three fp32 copies of the
    parameter are alive at once (each temporary is dropped or overwritten as soon as it is used)."""
    g = grad.float() * grad_scale
    squared = g.square().add_(eps)
    new_row = row * beta2t + squared.mean(dim=2) * (1.0 - beta2t)
    new_col = col * beta2t + squared.mean(dim=1) * (1.0 - beta2t)
    del squared
    row_factor = (new_row / new_row.mean(dim=1, keepdim=True)).rsqrt().unsqueeze(2)
    col_factor = new_col.unsqueeze(1).rsqrt()
    update = (row_factor * col_factor).mul_(g)
    del g
    new = _new_weights(param, update, lr, clip_threshold, weight_decay)
    del update
    copy_stochastic_(param, new)
    row.copy_(new_row)
    col.copy_(new_col)


def unfactored_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    beta2t: torch.Tensor,
    lr: torch.Tensor,
    grad_scale: torch.Tensor,
    eps: float,
    clip_threshold: float,
    weight_decay: float,
) -> None:
    """One Adafactor step in place on a 1-D parameter with its full second moment ``exp_avg_sq``."""
    g = grad.float() * grad_scale
    new_sq = exp_avg_sq * beta2t + g.square().add_(eps) * (1.0 - beta2t)
    update = new_sq.rsqrt().mul_(g)
    del g
    new = _new_weights(param, update, lr, clip_threshold, weight_decay)
    del update
    copy_stochastic_(param, new)
    exp_avg_sq.copy_(new_sq)


def _new_weights(param: torch.Tensor, update: torch.Tensor, lr: torch.Tensor, clip_threshold: float,
                 weight_decay: float) -> torch.Tensor:
    """``param`` in fp32 after the step: ``update`` (overwritten) clipped to an RMS of ``clip_threshold`` and scaled
    by ``lr``, taken from the decayed weights, in transformers' order of operations."""
    rms = torch.linalg.vector_norm(update) / math.sqrt(update.numel())
    update.div_((rms / clip_threshold).clamp(min=1.0)).mul_(lr)
    p = param.float() if param.dtype != torch.float32 else param.clone()
    if weight_decay:
        p.addcmul_(p, -weight_decay * lr)  # p + (-wd*lr)*p: transformers' p.add_(p, alpha=-wd*lr)
    return p.sub_(update)


@dataclass(frozen=True)
class _Slot:
    """Where one parameter lives: its range in the flat buffer, its 4-D view (None: one-dimensional, a full second
    moment) and the start of its statistics in the row/column (or full) state buffers."""

    offset: int
    numel: int
    view: tuple[int, int, int, int] | None
    state: int


def memory_view(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, int, int, int]:
    """``(A, R, C, D)``: a dense tensor of ``shape``/``stride`` (two dimensions or more) as a contiguous 4-D
    tensor in memory order, ``R``, ``C`` its last two dimensions, ``A`` and ``D`` its leading dimensions stored
    before and after them. Raises ValueError where the last two dimensions are not neighbours in memory."""
    n = len(shape)
    sized = sorted((d for d in range(n) if shape[d] != 1), key=lambda d: -stride[d])  # memory order, outer first
    matrix = [d for d in sized if d >= n - 2]
    if matrix:
        first = sized.index(matrix[0])
        if sized[first : first + len(matrix)] != matrix or matrix != sorted(matrix):
            raise ValueError(f"a parameter of shape {shape} and strides {stride}: its last two dimensions are not "
                             "neighbours in memory, in order")
        before, after = sized[:first], sized[first + len(matrix) :]
    else:
        before, after = sized, []
    return (math.prod(shape[d] for d in before), shape[-2], shape[-1], math.prod(shape[d] for d in after))


class FlatAdafactor:
    """Adafactor (see the module docstring) on a :class:`FlatParameters`, any device. ``update_range`` takes whole
    parameters, so :class:`BackwardStep` runs it one parameter a bucket (``bucket_elems``): each gradient is freed
    as soon as its parameter is updated."""

    bucket_elems = 1

    def __init__(
        self,
        flat: FlatParameters,
        lr: float,
        weight_decay: float = 0.0,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        max_grad_norm: float | None = None,
        compile: bool = False,
    ) -> None:
        self.flat = flat
        device = flat.data.device
        self.eps, self.clip_threshold, self.decay_rate = eps[0], clip_threshold, decay_rate
        self.weight_decay, self.max_grad_norm = weight_decay, max_grad_norm
        self.slots: list[_Slot] = []
        factored = unfactored = 0
        for p, offset in zip(flat.params, flat.offsets):
            if p.dim() >= 2:
                a, r, c, d = memory_view(tuple(p.shape), tuple(p.stride()))
                self.slots.append(_Slot(offset, p.numel(), (a, r, c, d), factored))
                factored += a * d * (r + c)
            else:
                self.slots.append(_Slot(offset, p.numel(), None, unfactored))
                unfactored += p.numel()
        self._offsets = [slot.offset for slot in self.slots]
        self.factored_state = torch.zeros(factored, dtype=torch.float32, device=device)
        """Row then column means of each factored parameter, one after the other."""
        self.exp_avg_sq = torch.zeros(unfactored, dtype=torch.float32, device=device)
        """The full second moment of the one-dimensional parameters."""
        self.step_count = torch.zeros((), dtype=torch.float32, device=device)
        self.lr = torch.full((), lr, dtype=torch.float32, device=device)
        self.beta2t = torch.zeros((), dtype=torch.float32, device=device)
        self._one = torch.ones((), dtype=torch.float32, device=device)
        self._factored = CompiledUpdate(factored_update_, compile)
        self._unfactored = CompiledUpdate(unfactored_update_, compile)

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state (both buffers)."""
        return (self.factored_state.numel() + self.exp_avg_sq.numel()) * 4

    def set_lr(self, lr: float) -> None:
        """Change the learning rate without a host-device sync."""
        self.lr.fill_(lr)

    def begin_step(self) -> torch.Tensor:
        """Advance the step count (and this step's second-moment decay); returns the gradient scale 1."""
        self.step_count.add_(1.0)
        self.beta2t.copy_(1.0 - self.step_count.pow(self.decay_rate))
        return self._one

    def update_range(self, start: int, stop: int, grad: torch.Tensor, grad_scale: torch.Tensor | None = None) -> None:
        """Update the parameters in ``flat.data[start:stop]`` (``start`` a parameter's offset, ``stop`` the next
        one's or the end) from ``grad`` (same length), after :meth:`begin_step`."""
        scale = self._one if grad_scale is None else grad_scale
        for slot, state in self._slots(start, stop):
            self._call(slot, self.flat.data, grad, start, state, self.beta2t, scale)

    def rehearse(self, start: int, stop: int, grad: torch.Tensor) -> None:
        """Run the update of ``[start, stop)`` on copies (weights and state unchanged): compiles and warms the
        kernels for those shapes before a CUDA graph records them."""
        beta2t = 1.0 - (self.step_count + 1).pow(self.decay_rate)
        for slot, state in self._slots(start, stop):
            data = self.flat.data[slot.offset : slot.offset + slot.numel].clone()
            self._call(slot, data, grad, start, tuple(s.clone() for s in state), beta2t, self._one, base=slot.offset)

    def _slots(self, start: int, stop: int):
        first = bisect.bisect_left(self._offsets, start)
        if first == len(self._offsets) or self._offsets[first] != start:
            raise ValueError(f"Adafactor updates whole parameters: {start} is no parameter's offset.")
        last = bisect.bisect_left(self._offsets, stop)
        if stop != self.flat.numel and (last == len(self._offsets) or self._offsets[last] != stop):
            raise ValueError(f"Adafactor updates whole parameters: {stop} is no parameter's offset.")
        for slot in self.slots[first:last]:
            yield slot, self._state_of(slot)

    def _state_of(self, slot: _Slot) -> tuple[torch.Tensor, ...]:
        if slot.view is None:
            return (self.exp_avg_sq[slot.state : slot.state + slot.numel],)
        a, r, c, d = slot.view
        rows, cols = a * r * d, a * c * d
        row = self.factored_state[slot.state : slot.state + rows].view(a, r, d)
        col = self.factored_state[slot.state + rows : slot.state + rows + cols].view(a, c, d)
        return row, col

    def _call(self, slot: _Slot, data: torch.Tensor, grad: torch.Tensor, start: int, state: tuple[torch.Tensor, ...],
              beta2t: torch.Tensor, scale: torch.Tensor, base: int = 0) -> None:
        at = slot.offset - base
        param = data[at : at + slot.numel]
        g = grad[slot.offset - start : slot.offset - start + slot.numel]
        args = (beta2t, self.lr, scale, self.eps, self.clip_threshold, self.weight_decay)
        if slot.view is None:
            self._unfactored(param, g, *state, *args)
        else:
            self._factored(param.view(slot.view), g.view(slot.view), *state, *args)

    @torch.no_grad()
    def step(self) -> None:
        """One step over the whole flat gradient (clipped to ``max_grad_norm`` first when set), then zero it."""
        assert self.flat.grad is not None, "FlatAdafactor.step needs FlatParameters(with_grad_buffer=True)"
        self.begin_step()
        self.update_range(0, self.flat.numel, self.flat.grad, clip_scale(self.flat.grad, self.max_grad_norm, self._one))
        self.flat.zero_grad()

    def state_dict(self) -> dict:
        """Second-moment statistics, step count and learning rate (for resume)."""
        return {"factored_state": self.factored_state, "exp_avg_sq": self.exp_avg_sq, "step": self.step_count,
                "lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.factored_state.copy_(state["factored_state"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.step_count.copy_(state["step"])
        self.lr.copy_(state["lr"])
        self.beta2t.copy_(1.0 - self.step_count.pow(self.decay_rate))
