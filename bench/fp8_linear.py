"""fp8 matrix products for the UNet's token-wise linear layers (Hopper-class GPUs: ``torch._scaled_mm``), the
experiment behind ``bench/micro.py --fp8``: measured slower than bf16 for SD 1.5 (see
``bench/results/2026-11-25-h200-groupnorm``), so the engine has no such option.

Each product scales its operands by their current absolute maximum (one scale per tensor, computed each call)
into fp8 — e4m3 for activations and weights, e5m2 for gradients, whose range matters more than their precision —
and accumulates in fp32 to a bf16 result. The weights stay bf16 (the optimizer never sees fp8); the forward keeps
only the fp8 copies of its operands for the backward, half the bytes of bf16 ones.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
ALIGNMENT = 16


def to_fp8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` scaled so its largest magnitude is ``dtype``'s largest, cast to ``dtype``; returns it and the
    fp32 scalar that multiplies it back."""
    top = torch.finfo(dtype).max
    amax = t.detach().abs().amax().float().clamp(min=1e-12)
    scale = top / amax
    return (t.float() * scale).clamp(-top, top).to(dtype), scale.reciprocal()


def _column_major(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous().t()


class _Fp8Matmul(torch.autograd.Function):
    """``x @ weight.T`` with both products of the backward in fp8 as well."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xq, x_scale = to_fp8(x, E4M3)
        wq, w_scale = to_fp8(weight, E4M3)
        ctx.save_for_backward(xq, x_scale, wq, w_scale)
        return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xq, x_scale, wq, w_scale = ctx.saved_tensors
        gq, g_scale = to_fp8(grad, E5M2)
        grad_x = torch._scaled_mm(gq, _column_major(wq), scale_a=g_scale, scale_b=w_scale, out_dtype=grad.dtype)
        grad_w = torch._scaled_mm(
            gq.t().contiguous(), _column_major(xq), scale_a=g_scale, scale_b=x_scale, out_dtype=grad.dtype
        )
        return grad_x, grad_w


class Fp8Linear(torch.nn.Linear):
    """An ``nn.Linear`` whose products run in fp8 when the shapes allow (every dimension a multiple of 16, which
    ``_scaled_mm`` needs) and in the weights' dtype otherwise. Same parameters, same state dict."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows % ALIGNMENT or self.in_features % ALIGNMENT or self.out_features % ALIGNMENT:
            return super().forward(x)
        out = _Fp8Matmul.apply(x.reshape(rows, x.shape[-1]), self.weight)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def token_linears(unet: torch.nn.Module) -> list[str]:
    """Names of the linear layers that act on the image's tokens inside the UNet's transformer blocks: self-
    attention's four, cross-attention's query and output, the feed-forward's two (not the text's keys and values,
    whose 77 tokens a batch seldom aligns to 16, nor the time embedding's)."""
    names = []
    for name, module in unet.named_modules():
        if type(module) is not torch.nn.Linear or ".transformer_blocks." not in name:
            continue
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            continue
        names.append(name)
    return names


def use_fp8_linears(unet: torch.nn.Module) -> int:
    """Turn :func:`token_linears` into :class:`Fp8Linear` in place (the same parameter objects); returns how many."""
    names = token_linears(unet)
    for name in names:
        unet.get_submodule(name).__class__ = Fp8Linear
    return len(names)
