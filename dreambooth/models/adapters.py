"""peft's LoRA layers inside the models, as the trainer and the LoRA files see them: which layers get adapters
(``lora_layers``), how wide a layer is, and each adapted layer's down, up and alpha."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from .components import Components
from .lora_file import LoraLayer, part_modules

ADAPTER = "default"
"""The name peft gives the one adapter a run trains."""

UNET_LAYERS: Mapping[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention_ff": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    "attention_ff_conv": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                          "conv1", "conv2", "conv_shortcut", "conv"),
}
"""``lora_layers`` → the UNet modules (by the last parts of their names) that get adapters."""

TEXT_ENCODER_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
"""A text encoder's adapters: every projection of its attention and MLP (all four attention projections, which
the web UI needs to patch OpenCLIP's fused attention)."""


def lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(module name, peft LoRA layer)`` of every adapted layer of ``model``."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and ADAPTER in getattr(module, "lora_A", {}):
            yield name, module


def width_of(module: torch.nn.Module) -> int:
    """The largest rank an adapter of this Linear or Conv2d can have: min(inputs × kernel, outputs)."""
    weight = module.weight
    return min(weight.shape[0], weight[0].numel())


def targeted(name: str, layers: tuple[str, ...]) -> bool:
    """Whether the module called ``name`` is one of ``layers`` (a whole name, or its last parts)."""
    return any(name == layer or name.endswith("." + layer) for layer in layers)


def adapter_layers(components: Components) -> dict[str, dict]:
    """``{part: {module path: LoraLayer}}`` of every adapter on the UNet and the text encoders, as trained."""
    found: dict[str, dict] = {}
    for part, model in part_modules(components):
        layers = {name: LoraLayer(layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight,
                                  float(layer.lora_alpha[ADAPTER]))
                  for name, layer in lora_layers(model)}
        if layers:
            found[part] = layers
    return found
