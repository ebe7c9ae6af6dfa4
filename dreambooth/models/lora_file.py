"""LoRA files in kohya's layout, the one the web UI's own Lora (1.10 and Forge), ComfyUI and diffusers read.

One safetensors file; each adapted layer has ``<name>.lora_down.weight`` ([rank, inputs(, kh, kw)]),
``<name>.lora_up.weight`` ([outputs, rank(, 1, 1)]) and ``<name>.alpha``; its weight in use is
``W + strength · (alpha / rank) · up @ down``. ``<name>`` is the family's prefix for the part (``lora_unet_``,
``lora_te_``; SDXL ``lora_te1_``/``lora_te2_``) and the layer's module path with ``_`` for ``.``, as diffusers
names it, or as the single file does: for SDXL's UNet (``family.lora_unet_names``), and for any UNet whose block
layout is not the released SD 1.x/2.x one, which the web UI's Lora assumes when it turns diffusers names into its
own (``webui_reads_diffusers_unet_names``). The header carries the ``ss_*`` training keys the web UI's Lora card
shows, and ModelSpec.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFormatError
from .components import Components
from .families import ModelFamily
from .layout import unet_module_to_ldm

DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
NETWORK_MODULE = "networks.lora"


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: ``down`` [rank, inputs(, kh, kw)], ``up`` [outputs, rank(, 1, 1)] and its alpha."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        """The adapter's rank, as the web UI reads it: the rows of ``down``."""
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """What the layer adds to its weight at strength 1: (alpha / rank) · up @ down, in float32."""
        down, up = self.down.float(), self.up.float()
        scale = self.alpha / self.rank
        if down.ndim == 4:
            return scale * torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
        return scale * up @ down


def webui_reads_diffusers_unet_names(unet_config: Mapping[str, Any]) -> bool:
    """Whether the web UI's Lora maps diffusers UNet names (``lora_unet_down_blocks_1_…``) onto the right layers.

    Its conversion (``convert_diffusers_name_to_compvis``) has the released SD 1.x/2.x layout built in: two layers
    a level (three LDM blocks), and an up-sampler at slot 1 in the first up level (no attention) and 2 in the
    others. On any other layout (the demo model has one layer a level) it patches other layers or none, so such
    a UNet's LoRA names its layers as the single file does (``lora_unet_input_blocks_1_1_…``), which the web UI,
    Forge, ComfyUI and diffusers all read.
    """
    up_has_attention = ["CrossAttn" in t for t in unet_config["up_block_types"]]
    return unet_config["layers_per_block"] == 2 and bool(up_has_attention) and not up_has_attention[0] \
        and all(up_has_attention[1:])


def lora_name(family: ModelFamily, part: str, module: str, unet_config: Mapping[str, Any]) -> str:
    """The key stem of ``part``'s module (its diffusers/transformers path) in a LoRA file of ``family``."""
    if part == "unet":
        if family.lora_unet_names == "ldm" or not webui_reads_diffusers_unet_names(unet_config):
            module = unet_module_to_ldm(module, unet_config)
    elif not module.startswith("text_model."):  # transformers 5's CLIPTextModel has no text_model level
        module = "text_model." + module
    return family.lora_prefixes[part] + module.replace(".", "_")


def part_modules(components: Components) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(part, model)`` of every part a LoRA can adapt: the UNet, then the text encoders."""
    yield "unet", components.unet
    yield from components.text_encoders.items()


def layers_of(family: ModelFamily, components: Components, adapters: Mapping[str, Mapping[str, LoraLayer]]
              ) -> dict[str, LoraLayer]:
    """``{part: {module path: layer}}`` as one file's layers, by their key stems."""
    config = components.unet.config
    return {lora_name(family, part, module, config): layer
            for part, layers in adapters.items() for module, layer in layers.items()}


def lora_tensors(layers: Mapping[str, LoraLayer], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's tensors: down, up (cast to ``dtype``) and alpha of every layer."""
    out = {}
    for name, layer in layers.items():
        out[name + DOWN] = layer.down.detach().to("cpu", dtype).contiguous()
        out[name + UP] = layer.up.detach().to("cpu", dtype).contiguous()
        out[name + ALPHA] = torch.tensor(float(layer.alpha), dtype=dtype)
    return out


def read_lora(path: Path) -> tuple[dict[str, LoraLayer], dict[str, str]]:
    """A LoRA file's layers by key stem, and its header; ``ModelFormatError`` when it is not a LoRA of this layout."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 -- not a safetensors file, truncated, unreadable
        raise ModelFormatError(f"{path} cannot be read as a safetensors file ({exc}).",
                         "Pick a LoRA file (.safetensors) written by a LoRA trainer.") from None
    stems = {k.removesuffix(DOWN) for k in tensors if k.endswith(DOWN)}
    other = [k for k in tensors if not any(k == s + end for s in stems for end in (DOWN, UP, ALPHA))]
    if not stems or other:
        raise ModelFormatError(
            f"{path.name} is not a LoRA in kohya's layout (lora_down/lora_up/alpha): "
            + (f"it also holds {other[:3]}." if stems else "it has no lora_down weights."),
            "LyCORIS (LoHa, LoKr) and full checkpoints cannot be used here; pick a plain LoRA file.")
    layers = {}
    for stem in sorted(stems):
        down, up = tensors[stem + DOWN], tensors.get(stem + UP)
        if up is None:
            raise ModelFormatError(f"{path.name}: layer {stem} has no lora_up weight.", "The file is damaged.")
        alpha = tensors.get(stem + ALPHA)
        layers[stem] = LoraLayer(down, up, float(alpha) if alpha is not None else float(down.shape[0]))
    return layers, metadata


def lora_metadata(
    family: ModelFamily,
    prediction_type: str,
    resolution: int,
    output_name: str,
    title: str,
    layers: Mapping[str, LoraLayer],
    training: Mapping[str, Any],
) -> dict[str, str]:
    """The header: the ``ss_*`` keys kohya's trainers write and the web UI's Lora card reads, and ModelSpec."""
    from .export import modelspec

    ranks = sorted({layer.rank for layer in layers.values()})
    alphas = sorted({layer.alpha for layer in layers.values()})
    meta = modelspec(family, prediction_type, resolution, title, training)
    meta["modelspec.architecture"] = family.architecture(prediction_type) + "/lora"
    meta.update({
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "dynamic",
        "ss_network_alpha": f"{alphas[0]:g}" if len(alphas) == 1 else "dynamic",
        "ss_base_model_version": family.lora_base_version,
        "ss_v2": str(family.name == "sd2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_output_name": output_name,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_training_started_at": str(training.get("started_at", "")),
        "ss_training_finished_at": str(_dt.datetime.now().timestamp()),
    })
    for key, value in training.items():
        if key.startswith("ss_"):
            meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta
