"""Write a model as one file in the original (CompVis/LDM) layout that the web UI, ComfyUI and diffusers read.

The file appears whole or not at all (``fileio.write_atomic``). Safetensors files carry ModelSpec metadata
(``modelspec.*``) and our training summary under ``dreambooth.training``; a model of a shape other than its
family's stock one also carries its diffusers config folder under ``dreambooth.diffusers_config``, so that it
loads with no config folder at hand (``models.load``).
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..fileio import write_atomic
from .components import Components
from .families import ModelFamily, family_named, family_of

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
CONFIG_METADATA_KEY = "dreambooth.diffusers_config"


def checkpoint_tensors(
    components: Components,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
    family: ModelFamily | None = None,
) -> dict[str, torch.Tensor]:
    """Every tensor of the single file: the models under their original names in the family's layout (floats cast
    to ``dtype``), then the source's other tensors (noise-schedule buffers ...) exactly as they were."""
    family = family or family_of(components)
    tensors = family.export_tensors(components)
    out = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in tensors.items()
    }
    for key, value in (extra_tensors or {}).items():
        out.setdefault(key, value.contiguous())
    for key, value in family.placeholder_tensors(components).items():
        out.setdefault(key, value.to(dtype).contiguous())
    return out


def modelspec(
    family: ModelFamily | str,
    prediction_type: str,
    resolution: int,
    title: str,
    training: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """ModelSpec header fields plus our training summary, all strings as safetensors requires."""
    family = family_named(family) if isinstance(family, str) else family
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.architecture(prediction_type),
        "modelspec.implementation": "https://github.com/CompVis/stable-diffusion",
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.title": title,
        "modelspec.date": _dt.date.today().isoformat(),
    }
    if training:
        meta["dreambooth.training"] = json.dumps(training, sort_keys=True, default=str)
    return meta


def config_metadata(diffusers_config: Mapping[str, Any] | None) -> dict[str, str]:
    """The header entry carrying a model's config folder (file name → JSON), or nothing for a stock model."""
    if diffusers_config is None:
        return {}
    return {CONFIG_METADATA_KEY: json.dumps(diffusers_config, sort_keys=True, separators=(",", ":"))}


def save_checkpoint(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` (``.safetensors`` with metadata, or a ``.ckpt`` with a ``state_dict``)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        return write_atomic(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=dict(metadata or {})))
    if path.suffix == ".ckpt":
        return write_atomic(path, lambda tmp: torch.save({"state_dict": dict(tensors)}, str(tmp)))
    raise ValueError(f"unknown checkpoint format: {path.suffix}")
