"""Every parameter (and its gradient) as a view into one flat buffer.

One buffer lets an optimizer update all weights with one fused kernel instead of a few kernels per tensor, and
lets a bucket of neighbouring parameters be addressed as one slice. Each view keeps its parameter's strides, so
a model converted to channels_last stays channels_last. Offsets are aligned (default 256 elements) so that
block-wise quantized optimizer state never straddles two parameters' slices at a bucket edge. On a GPU the
parameters pass through host memory while the buffer is built, so the peak is one copy of the weights, not two
(SDXL's UNet in bf16: 5.1 GB, not 10.3).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class FlatParameters:
    """Parameters re-homed into ``self.data`` (one 1-D tensor); gradients into ``self.grad`` when asked for."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        dtype: torch.dtype | None = None,
        with_grad_buffer: bool = True,
        align: int = 256,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("FlatParameters needs at least one trainable parameter.")
        for p in self.params:
            if not p.is_contiguous() and not _is_dense(p):
                raise ValueError("FlatParameters needs dense parameters (contiguous or channels_last).")
        device = self.params[0].device
        self.dtype = dtype or self.params[0].dtype
        self.offsets: list[int] = []
        total = 0
        for p in self.params:
            self.offsets.append(total)
            total += -(-p.numel() // align) * align
        self.numel = total
        if device.type == "cuda":  # through host memory: two copies of the weights would meet on the GPU otherwise
            for p in self.params:
                p.data = p.data.to("cpu")
        self.data = torch.zeros(total, dtype=self.dtype, device=device)
        for p, offset in zip(self.params, self.offsets):
            view = self.data.as_strided(p.shape, p.stride(), offset)
            view.copy_(p.detach())
            p.data = view
        self.grad: torch.Tensor | None = None
        if with_grad_buffer:
            self.grad = torch.zeros(total, dtype=self.dtype, device=device)
            self.attach_grad_views()

    def attach_grad_views(self) -> None:
        """Point every ``p.grad`` at its slice of ``self.grad``: autograd then accumulates into it in place."""
        assert self.grad is not None
        for p, offset in zip(self.params, self.offsets):
            p.grad = self.grad.as_strided(p.shape, p.stride(), offset)

    def zero_grad(self) -> None:
        """Clear the flat gradient with one kernel (the views stay attached)."""
        if self.grad is not None:
            self.grad.zero_()

    def slice_of(self, index: int) -> slice:
        """The flat range of parameter ``index`` (without its alignment padding)."""
        start = self.offsets[index]
        return slice(start, start + self.params[index].numel())


def _is_dense(t: torch.Tensor) -> bool:
    """True when ``t``'s elements occupy exactly ``numel`` consecutive storage slots (any dimension order)."""
    order = sorted(range(t.dim()), key=lambda d: t.stride(d))
    expected = 1
    for d in order:
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True
