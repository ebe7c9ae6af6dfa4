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
        return write_atomic(path, lambda tmp: write_safetensors(tmp, tensors, metadata))
    if path.suffix == ".ckpt":
        return write_atomic(path, lambda tmp: torch.save({"state_dict": dict(tensors)}, str(tmp)))
    raise ValueError(f"unknown checkpoint format: {path.suffix}")


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    **{getattr(torch, name): code for name, code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"))
       if hasattr(torch, name)},
}


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """The safetensors format (8-byte header length, JSON header, the tensors' bytes back to back), written one
    tensor at a time. ``safetensors.torch.save_file`` first builds every tensor's bytes in memory: a second full
    copy of the model for the length of the write (6.5 GB more for an SDXL saved in fp16)."""
    names = sorted(tensors)
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: safetensors has no {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for name in names:
            flat = tensors[name].detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                handle.write(flat.view(torch.uint8).numpy().data)


def save_checkpoint_for_hosts(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                              family: ModelFamily, diffusers_config: Mapping[str, Any] | None, prediction_type: str,
                              tokenizer_dir: str = "") -> tuple[Path | None, str]:
    """Write the checkpoint ``path`` after the ``.yaml`` the web UIs need beside it (they list the checkpoint as
    soon as it exists): the family's stock one (SD 2.x v for Forge), or one built from a non-stock model's
    configs; none where the web UI builds the model from its weights alone, or cannot build it at all. Returns the
    yaml written (or None) and, in the last case, why the web UI gets none (a line for the log; '' otherwise). A
    yaml this call wrote is removed again when the checkpoint cannot be written; a stale one is removed too."""
    from .host_yaml import write_host_yaml

    yaml_path, note = path.with_suffix(".yaml"), ""
    yaml_existed = yaml_path.exists()
    problems = family.host_yaml_problems(diffusers_config, prediction_type)
    written = None
    if problems:
        yaml_path.unlink(missing_ok=True)  # one an older version wrote would fail in the web UI
        note = (f"{path.name} gets no .yaml: the web UI cannot build this model, because {'; '.join(problems)}. "
                "Diffusers and this extension load it.")
    elif problems is not None:
        written = write_host_yaml(path, diffusers_config, tokenizer_dir=tokenizer_dir)
    elif (stock := family.stock_host_yaml(prediction_type)) is not None:
        written = write_atomic(yaml_path, lambda p: p.write_text(stock, encoding="utf-8"))
    try:
        save_checkpoint(path, tensors, metadata)
    except BaseException:
        if not yaml_existed:  # no new yaml without its checkpoint
            yaml_path.unlink(missing_ok=True)
        raise
    return written, note
