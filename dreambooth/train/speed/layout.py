"""Memory layout and compilation switches for the denoiser."""

from __future__ import annotations

import time

import torch


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Store 4-D weights as NHWC (cuDNN's native layout for bf16 convolutions on tensor cores); returns ``module``."""
    return module.to(memory_format=torch.channels_last)


def compile_module(module: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
    """``torch.compile`` with static shapes (one graph per batch size and resolution); ``mode`` as torch's."""
    return torch.compile(module, mode=mode, dynamic=False)


class Stopwatch:
    """Wall-clock seconds around device work: synchronizes at both ends so queued kernels are counted."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = torch.device(device) if device is not None else None
        self.start = 0.0

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Stopwatch:  # noqa: PYI034 (typing.Self needs Python 3.11; the web UI runs 3.10)
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self.start


def compile_blocks(module: torch.nn.Module, block_names: tuple[str, ...] = ("BasicTransformerBlock", "ResnetBlock2D",
                   "Transformer2DModel", "Downsample2D", "Upsample2D"), mode: str | None = None) -> int:
    """Compile each repeated block in place (``nn.Module.compile``) instead of the whole model: blocks of one
    class share compiled code, so compilation takes a fraction of a whole-model compile, and each block's
    backward is its own graph (gradient hooks fire block by block). Outer-most matches win; returns the count."""
    count = 0

    def visit(parent: torch.nn.Module) -> None:
        nonlocal count
        for child in parent.children():
            if type(child).__name__ in block_names:
                child.compile(mode=mode)
                count += 1
            else:
                visit(child)

    visit(module)
    return count
