"""The whole training step recorded as one CUDA graph: UNet forward, loss, backward, and the optimizer step
fused into the backward (``backward.py``), gradient checkpointing included.

Graphing only the UNet (``layout.graph_denoiser``) leaves every gradient alive until the graph ends, which the
fused optimizer step exists to avoid, and leaves its thousands of per-bucket launches to the host. Here the
backward's gradient hooks run while the graph is being recorded, so their updates are recorded with it; one
replay then costs a few host microseconds whatever the number of kernels. What makes that sound:
- the step count, learning rate and gradient scale are device tensors (``FlatAdamW``, ``FlatAdamW8bit``), so
  the recorded update reads this step's values;
- the warm-up passes run with the optimizer *rehearsing* (same kernels on copies), so recording changes no
  weight;
- stochastic rounding draws from the default CUDA generator, which a replay advances like an eager step;
- gradient checkpointing must not stash RNG states (``enable_checkpointing``): that reads the generator on the
  host, which a recording forbids.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from .backward import BackwardStep


class StepGraph:
    """A recorded step: ``graph(**inputs)`` copies the inputs into the recorded buffers, replays, returns the loss."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        self.graph, self.inputs, self.loss = graph, inputs, loss

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        for name, buffer in self.inputs.items():
            buffer.copy_(inputs[name])
        self.graph.replay()
        return self.loss.clone()  # the recorded loss buffer is overwritten by the next replay


def capture_step(
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    backward_step: BackwardStep,
    example: dict[str, torch.Tensor],
    warmup: int = 2,
) -> StepGraph:
    """Record ``loss_of(inputs).backward()`` with ``backward_step``'s updates inside, for inputs shaped like
    ``example`` (dtypes, memory formats and shapes are fixed from now on). Raises RuntimeError when a kernel
    cannot be recorded; weights and optimizer state are then unchanged."""
    inputs = {name: tensor.clone(memory_format=torch.preserve_format) for name, tensor in example.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    backward_step.rehearsing = True
    try:
        with torch.cuda.stream(side):
            for _ in range(warmup):  # kernels chosen, compiled and allocated once outside the recording
                loss_of(inputs).backward()
                backward_step.finish()
        torch.cuda.current_stream().wait_stream(side)
        backward_step.rehearsing = False
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = loss_of(inputs)
            loss.backward()
            backward_step.finish()
    except Exception as exc:
        backward_step.reset()
        raise RuntimeError(f"the training step could not be recorded as a CUDA graph: {exc}") from exc
    finally:
        backward_step.rehearsing = False
    return StepGraph(graph, inputs, loss.detach())


def _checkpoint_without_rng_state(module: torch.nn.Module, *args):
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)


def enable_checkpointing(unet: torch.nn.Module) -> bool:
    """Turn on the UNet's gradient checkpointing; without RNG-state stashing when the UNet draws no random numbers
    (dropout 0) and diffusers lets us pass the function (>= 0.32). Returns whether the stashing is off."""
    accepts_function = "gradient_checkpointing_func" in inspect.signature(unet.enable_gradient_checkpointing).parameters
    if accepts_function and not getattr(unet.config, "dropout", 0.0):
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=_checkpoint_without_rng_state)
        return True
    unet.enable_gradient_checkpointing()
    return False


def checkpointing_is_graph_safe(unet: torch.nn.Module) -> bool:
    """Whether the UNet's checkpointing was turned on by :func:`enable_checkpointing` without RNG stashing."""
    functions = {
        getattr(module, "_gradient_checkpointing_func", None)
        for module in unet.modules()
        if getattr(module, "gradient_checkpointing", False) is True
    }
    return functions == {_checkpoint_without_rng_state}
