"""AdamW over a flat buffer, with bf16 weights written back by stochastic rounding.

The arithmetic is torch.optim.AdamW's, done in fp32 whatever the storage dtype. The step count, learning rate
and gradient-clipping factor live on the device, so a step never waits for the host, and the whole update is
one elementwise function that ``torch.compile`` fuses into a single kernel over all weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .flat import FlatParameters
from .rounding import copy_stochastic_


class CompiledUpdate:
    """An elementwise update function, fused by ``torch.compile`` when ``compile``; if compiling fails (before
    anything is written), the eager function takes over for good, with a warning."""

    def __init__(self, function: Callable[..., None], compile: bool) -> None:
        self.function = function
        self._run: Callable[..., None] = torch.compile(function, dynamic=True) if compile else function

    def __call__(self, *args) -> None:
        try:
            self._run(*args)
        except Exception as exc:
            if self._run is self.function:
                raise
            warnings.warn(f"the compiled {self.function.__name__} failed ({type(exc).__name__}: {exc}); "
                          "using the eager one", stacklevel=3)
            self._run = self.function
            self._run(*args)


def adamw_arithmetic(
    p: torch.Tensor,
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    step: torch.Tensor,
    lr: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.optim.AdamW's step on fp32 tensors: new (weights, first moment, second moment) from the old ones and
    the gradient ``g``; ``step`` is the count after this step. Shared by the fp32/bf16 and the 8-bit updates."""
    m = m.lerp(g, 1.0 - beta1)
    v = v * beta2 + g * g * (1.0 - beta2)
    denom = v.sqrt() / (1.0 - beta2**step).sqrt() + eps
    p = p * (1.0 - lr * weight_decay) - (lr / (1.0 - beta1**step)) * m / denom
    return p, m, v


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: torch.Tensor,
    grad_scale: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step in place on 1-D slices. ``step`` (count after this step), ``lr``, ``grad_scale`` are
    0-d fp32 device tensors. bf16 ``param``/state are written with stochastic rounding, fp32 ones exactly."""
    p, m, v = adamw_arithmetic(param.float(), grad.float() * grad_scale, exp_avg.float(), exp_avg_sq.float(),
                               step, lr, beta1, beta2, eps, weight_decay)
    copy_stochastic_(param, p)
    copy_stochastic_(exp_avg, m)
    copy_stochastic_(exp_avg_sq, v)


def clip_scale(grad: torch.Tensor, max_grad_norm: float | None, one: torch.Tensor) -> torch.Tensor:
    """The factor that scales ``grad`` to a norm of at most ``max_grad_norm`` (a 0-d device tensor, no host
    sync); ``one`` when clipping is off."""
    if not max_grad_norm:
        return one
    norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
    return torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)


class FlatAdamW:
    """AdamW on a :class:`FlatParameters`; ``state_dtype`` fp32 (exact moments) or bf16 (half the memory)."""

    bucket_elems = 32 * 1024 * 1024
    """Elements per bucket inside the backward pass (``backward.py``)."""

    def __init__(
        self,
        flat: FlatParameters,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        state_dtype: torch.dtype = torch.float32,
        max_grad_norm: float | None = None,
        compile: bool = False,
    ) -> None:
        self.flat = flat
        device = flat.data.device
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay, self.max_grad_norm = eps, weight_decay, max_grad_norm
        self.exp_avg = torch.zeros(flat.numel, dtype=state_dtype, device=device)
        self.exp_avg_sq = torch.zeros(flat.numel, dtype=state_dtype, device=device)
        self.step_count = torch.zeros((), dtype=torch.float32, device=device)
        self.lr = torch.full((), lr, dtype=torch.float32, device=device)
        self._one = torch.ones((), dtype=torch.float32, device=device)
        self._update = CompiledUpdate(adamw_update_, compile)

    def set_lr(self, lr: float) -> None:
        """Change the learning rate without a host-device sync."""
        self.lr.fill_(lr)

    def begin_step(self) -> torch.Tensor:
        """Advance the step count; returns the gradient scale (clipping factor, or 1)."""
        self.step_count.add_(1.0)
        return self._one

    def update_range(self, start: int, stop: int, grad: torch.Tensor, grad_scale: torch.Tensor | None = None) -> None:
        """Update ``flat.data[start:stop]`` from ``grad`` (same length), after :meth:`begin_step`."""
        self._call(self.flat.data[start:stop], grad, self.exp_avg[start:stop], self.exp_avg_sq[start:stop],
                   self.step_count, self._one if grad_scale is None else grad_scale)

    def rehearse(self, start: int, stop: int, grad: torch.Tensor) -> None:
        """Run the update of ``[start, stop)`` on copies (weights and state unchanged): compiles and warms the
        kernels for that size before a CUDA graph records them."""
        self._call(self.flat.data[start:stop].clone(), grad, self.exp_avg[start:stop].clone(),
                   self.exp_avg_sq[start:stop].clone(), self.step_count + 1, self._one)

    def _call(self, param, grad, exp_avg, exp_avg_sq, step, grad_scale) -> None:
        self._update(param, grad, exp_avg, exp_avg_sq, step, self.lr, grad_scale, self.beta1, self.beta2, self.eps,
                     self.weight_decay)

    @torch.no_grad()
    def step(self) -> None:
        """One step over the whole flat gradient (clipped to ``max_grad_norm`` first when set), then zero it."""
        assert self.flat.grad is not None, "FlatAdamW.step needs FlatParameters(with_grad_buffer=True)"
        self.begin_step()
        self.update_range(0, self.flat.numel, self.flat.grad, clip_scale(self.flat.grad, self.max_grad_norm, self._one))
        self.flat.zero_grad()

    def state_dict(self) -> dict:
        """Moments and step count (for resume)."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "step": self.step_count, "lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.step_count.copy_(state["step"])
        self.lr.copy_(state["lr"])
