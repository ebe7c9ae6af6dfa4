"""Frozen base weights stored in 8-bit floats (kohya's ``--fp8_base``), upcast layer by layer as each one runs.

A LoRA run never changes its model's own weights, so they need not sit in 16 bits: :func:`store_frozen_in_fp8`
keeps every frozen ``nn.Linear`` and ``nn.Conv2d`` weight of a model in ``torch.float8_e4m3fn`` (one byte a weight,
half of bf16: SDXL's UNet 5.1 → 2.6 GB) and gives the layer a forward that upcasts its weight to the layer's compute
dtype (what the weight was before) just before the matmul or convolution, then drops the copy.

What happens to the bits: each weight tensor is first multiplied by one power of two, chosen so that its largest
magnitude lands in [224, 448] (448 is float8_e4m3fn's largest value), then rounded to the nearest float8 (3 mantissa
bits: at most 1/16 relative error, about 2.7% RMS on Gaussian weights). The power of two is kept with the layer and
divided out at each upcast, which is exact in bf16 and fp32: the weight a forward sees is exactly the float8 value ×
2^-k. Without the scale, small weights (|w| < 2^-6) fall into float8's subnormals and lose most of their digits.

The upcast runs inside an autograd function that saves the float8 weight (no new memory) and upcasts it again in the
backward pass for the input's gradient; a plain ``weight.to(bf16)`` in the forward would let autograd keep every
layer's 16-bit copy alive until the backward, which is the whole 16-bit model again. Biases, norms, embeddings, the
adapters and the layer that owns the model's first parameter (the UNet's ``conv_in``) keep the compute dtype:
diffusers' and transformers' ``model.dtype`` read the first floating-point parameter, and pipelines make their
latents and embeddings in that dtype.

Moving such a model with ``model.to(device)`` keeps the float8 weights; ``model.to(dtype)`` would widen them back,
so :func:`cast_keeping_fp8` casts the rest instead. Composes with peft's LoRA layers (convert after the adapters are
injected: peft gives a new adapter its base layer's dtype), with gradient checkpointing (the recomputed forward
upcasts again), with CUDA graphs (the casts are recorded kernels) and with ``torch.compile``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError

FLOAT8 = "float8_e4m3fn"
"""The storage dtype's name in ``torch`` (4 exponent bits, 3 mantissa bits, no infinities: finer than e5m2)."""
FLOAT8_MAX = 448.0
"""float8_e4m3fn's largest finite value."""


def float8_dtype() -> torch.dtype:
    """``torch.float8_e4m3fn``; a :class:`ConfigError` where this torch has no float8 types (before 2.1)."""
    dtype = getattr(torch, FLOAT8, None)
    if dtype is None:
        raise ConfigError(
            f"'lora_base_precision' fp8 needs PyTorch's float8 types (torch 2.1 or later); this is "
            f"{torch.__version__}.",
            "Set 'lora_base_precision' to weights, or update PyTorch.",
        )
    return dtype


def is_fp8(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is stored in one of torch's float8 dtypes."""
    return "float8" in str(tensor.dtype)


class _UpcastLinear(torch.autograd.Function):
    """``F.linear(x, weight · scale in dtype, bias)`` that keeps only the float8 weight for its backward."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, dtype):
        ctx.save_for_backward(weight)
        ctx.scale = scale
        return F.linear(x, _upcast(weight, scale, dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = grad.matmul(_upcast(weight, ctx.scale, grad.dtype)) if ctx.needs_input_grad[0] else None
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias, None


class _UpcastConv2d(torch.autograd.Function):
    """``F.conv2d`` with the float8 weight upcast, keeping only the float8 weight for its backward."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.scale, ctx.geometry, ctx.input_shape = scale, (stride, padding, dilation, groups), x.shape
        return F.conv2d(x, _upcast(weight, scale, dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, _upcast(weight, ctx.scale, grad.dtype), grad,
                                                *ctx.geometry)
        if ctx.needs_input_grad[3]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, None, None, grad_bias, None, None, None, None, None


def _upcast(weight: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    upcast = weight.to(dtype)
    return upcast.mul_(scale) if scale != 1.0 else upcast


class Float8Linear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is stored in float8 × ``weight_scale`` and computed in
    ``compute_dtype`` (set by :func:`store_frozen_in_fp8`, which turns plain ``nn.Linear`` layers into these)."""

    compute_dtype: torch.dtype
    weight_scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise RuntimeError("A float8-stored weight is frozen; it cannot train.")
        return _UpcastLinear.apply(x, self.weight, self.weight_scale, self.bias, self.compute_dtype)


class Float8Conv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (zero padding) whose frozen weight is stored in float8, as :class:`Float8Linear`."""

    compute_dtype: torch.dtype
    weight_scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise RuntimeError("A float8-stored weight is frozen; it cannot train.")
        return _UpcastConv2d.apply(x, self.weight, self.weight_scale, self.bias, self.compute_dtype, self.stride,
                                   self.padding, self.dilation, self.groups)


_FLOAT8_CLASSES = {nn.Linear: Float8Linear, nn.Conv2d: Float8Conv2d}


def upcast_weight(module: nn.Module) -> torch.Tensor:
    """The weight ``module`` computes with: a float8 layer's weight upcast and rescaled (what a merge of an adapter
    into it must start from), any other layer's weight as it is."""
    if isinstance(module, (Float8Linear, Float8Conv2d)):
        return _upcast(module.weight.detach(), module.weight_scale, module.compute_dtype)
    return module.weight.detach()


def store_frozen_in_fp8(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Store every frozen plain ``nn.Linear`` / zero-padded ``nn.Conv2d`` weight of ``model`` in float8 (scaled by a
    power of two, see the module docstring) and cast every other floating-point tensor to ``compute_dtype``, in
    place, where the model is; those layers then upcast their weight to ``compute_dtype`` for each forward. Skipped:
    layers whose weight trains, peft's adapter layers, subclasses of Linear/Conv2d (their forward may take other
    arguments) and the layer owning the model's first floating-point parameter. Returns the layers converted."""
    float8 = float8_dtype()
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    converted = 0
    for name, module in model.named_modules():
        target = _FLOAT8_CLASSES.get(type(module))
        if target is None or any(part.startswith("lora_") for part in name.split(".")):
            continue
        weight = module.weight
        if weight.requires_grad or weight is first or is_fp8(weight):
            continue
        if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
            continue
        with torch.no_grad():
            amax = float(weight.detach().abs().max()) if weight.numel() else 0.0
            exponent = math.floor(math.log2(FLOAT8_MAX / amax)) if amax > 0 and math.isfinite(amax) else 0
            stored = (weight.detach().float() * 2.0**exponent).to(float8)
        weight.data = stored
        module.weight_scale = 2.0**-exponent
        module.compute_dtype = compute_dtype
        module.__class__ = target
        converted += 1
    cast_keeping_fp8(model, compute_dtype)
    return converted


def cast_keeping_fp8(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)`` for every floating-point parameter and buffer except the float8 ones."""
    return model._apply(lambda t: t.to(dtype) if t.is_floating_point() and not is_fp8(t) else t)
