"""Memory layout and compilation switches for the denoiser."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Store 4-D weights as NHWC (cuDNN's native layout for bf16 convolutions on tensor cores); returns ``module``."""
    return module.to(memory_format=torch.channels_last)


def uses_channels_last(requested: bool, device: torch.device) -> bool:
    """Whether the UNet runs channels-last: when asked for, and not on the CPU, where torch's channels-last group
    norm loses precision and nothing is faster for it (the CPU keeps NCHW whatever the option says)."""
    return requested and device.type != "cpu"


def compile_module(module: torch.nn.Module, mode: str | None = None) -> torch.nn.Module:
    """``torch.compile`` with static shapes (one graph per batch size and resolution); ``mode`` as torch's."""
    return torch.compile(module, mode=mode, dynamic=False)


def compile_blocks(
    module: torch.nn.Module,
    block_names: tuple[str, ...] = (
        "BasicTransformerBlock",
        "ResnetBlock2D",
        "Transformer2DModel",
        "Downsample2D",
        "Upsample2D",
    ),
    mode: str | None = None,
    shapes: int = 1,
) -> int:
    """Compile each repeated block in place (``nn.Module.compile``) instead of the whole model: blocks of one
    class share compiled code, so compilation takes a fraction of a whole-model compile, and each block's
    backward is its own graph (gradient hooks fire block by block). Outer-most matches win; returns the count.
    ``shapes``: how many input shapes the model will see (aspect-ratio buckets), each compiled on its own."""
    count = 0

    def visit(parent: torch.nn.Module) -> None:
        nonlocal count
        for child in parent.children():
            if type(child).__name__ in block_names:
                child.compile(mode=mode, dynamic=False)
                count += 1
            else:
                visit(child)

    visit(module)
    _allow_recompiles(count * shapes)
    return count


def uncompile_blocks(module: torch.nn.Module) -> dict[torch.nn.Module, object]:
    """Undo :func:`compile_blocks`: every block runs its plain forward again; returns what was undone.

    ``nn.Module.compile`` keeps the compiled callable in ``_compiled_call_impl`` (torch 2.2 to 2.13 checked)."""
    undone = {}
    for child in module.modules():
        if getattr(child, "_compiled_call_impl", None) is not None:
            undone[child] = child._compiled_call_impl
            child._compiled_call_impl = None
    return undone


@contextlib.contextmanager
def blocks_uncompiled(module: torch.nn.Module) -> Iterator[None]:
    """Inside, compiled blocks run their plain forward (calls of other shapes compile nothing) with plain group
    norms (:class:`ChannelsLastGroupNorm` is written for the compiler); after, as before."""
    undone = uncompile_blocks(module)
    norms = plain_group_norms(module)
    try:
        yield
    finally:
        for child, compiled in undone.items():
            child._compiled_call_impl = compiled
        for norm in norms:
            norm.__class__ = ChannelsLastGroupNorm


def _allow_recompiles(count: int) -> None:
    """Blocks of one class share a code object, and each shape among them is its own compiled graph: past
    dynamo's recompile limit (8) the rest would silently run eagerly, so raise it to one per block and input shape.
    The limit is process-wide; training runs in its own process."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name, count) < count:
        setattr(config, name, count)


class _Denoiser(torch.nn.Module):
    """``unet(x, t, conditioning)`` with positional tensors in and one tensor out, as CUDA graph capture needs; the
    conditioning's parts come in the order of ``names`` (``Conditioning.tensors()``)."""

    def __init__(self, unet: torch.nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.unet = unet
        self.names = list(names)

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
        from ...models.conditioning import Conditioning

        conditioning = Conditioning.from_tensors(dict(zip(self.names, parts)))
        return self.unet(sample, timesteps, **conditioning.unet_kwargs(), return_dict=False)[0]


def graph_denoiser(
    unet: torch.nn.Module, sample: torch.Tensor, timesteps: torch.Tensor, conditioning: Mapping[str, torch.Tensor]
) -> Callable[..., torch.Tensor]:
    """Capture the UNet's forward and backward as CUDA graphs (``torch.cuda.make_graphed_callables``) for inputs
    of exactly these shapes, dtypes and memory formats; ``conditioning`` is ``Conditioning.tensors()``. The result
    is called as ``f(sample, timesteps, *conditioning.values())`` and replays both graphs, so a step costs a handful
    of launches instead of thousands. No compiler needed. Needs: no autocast, no host syncs or data-dependent control
    flow in the forward, weights updated in place."""
    module = _Denoiser(unet, list(conditioning))
    return torch.cuda.make_graphed_callables(module, (sample, timesteps, *conditioning.values()), num_warmup_iters=3)


class ChannelsLastGroupNorm(torch.nn.GroupNorm):
    """``nn.GroupNorm`` computed in a channels-last input's own memory order, for compiled UNets: per-channel
    sums over the pixels first (each pixel's channels are contiguous, so the compiler's kernels read memory in
    order), then sums over each group's channels; the variance from the centred values (two passes, as exact as
    ``nn.GroupNorm``). The compiler's own group norm on channels-last input strides by the channel count and is
    what made channels-last compiled UNets slower than NCHW ones. Same parameters, state dict and result; other
    inputs take ``nn.GroupNorm``'s path. Uncompiled it is several small operations instead of one: use it only
    inside compiled code (:func:`channels_last_group_norms`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        n, c, h, w = x.shape
        per_group = c // self.num_groups
        pixels = x.permute(0, 2, 3, 1).reshape(n, h * w, c).float()  # a view: channels-last memory is (n, hw, c)

        def group_mean(per_channel_sum: torch.Tensor) -> torch.Tensor:
            means = per_channel_sum.reshape(n, self.num_groups, per_group).sum(dim=2) / (h * w * per_group)
            return means.repeat_interleave(per_group, dim=1).unsqueeze(1)  # (n, 1, c)

        centred = pixels - group_mean(pixels.sum(dim=1))
        y = centred * torch.rsqrt(group_mean(centred.square().sum(dim=1)) + self.eps)
        if self.affine:
            y = y * self.weight.float() + self.bias.float()
        cuda_autocast = x.device.type == "cuda" and torch.is_autocast_enabled()  # there group norm runs in fp32
        return y.to(torch.float32 if cuda_autocast else x.dtype).reshape(n, h, w, c).permute(0, 3, 1, 2)


def channels_last_group_norms(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Make each ``nn.GroupNorm`` inside a block :func:`compile_blocks` compiled a :class:`ChannelsLastGroupNorm`
    in place (the same parameter objects; norms outside compiled blocks stay plain); returns them."""
    swapped = []
    for block in module.modules():
        if getattr(block, "_compiled_call_impl", None) is None:
            continue
        for child in block.modules():
            if type(child) is torch.nn.GroupNorm:
                child.__class__ = ChannelsLastGroupNorm
                swapped.append(child)
    return swapped


def plain_group_norms(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Undo :func:`channels_last_group_norms`; returns the norms it made plain again."""
    restored = []
    for child in module.modules():
        if type(child) is ChannelsLastGroupNorm:
            child.__class__ = torch.nn.GroupNorm
            restored.append(child)
    return restored
