"""Read a single-file checkpoint's tensors safely and tell which model family it is."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFormatError
from .layout import TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def read_keys(path: Path) -> list[str]:
    """The tensor names in a checkpoint; errors name the file when it is not one."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except Exception as exc:  # safetensors raises its own error types, and OSError
            raise _not_a_checkpoint(path, exc) from None
    return list(read_tensors(path))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` or ``.ckpt`` file (a Lightning ``state_dict`` is unwrapped).

    Pickled checkpoints are read with torch's weights-only loader; old ones that also pickled Lightning
    callbacks are read with an unpickler that stubs those classes and refuses any other code.
    """
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise _not_a_checkpoint(path, exc) from None
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():
            raise _not_a_checkpoint(path, exc) from None
        data = _load_with_stubs(path)
    except Exception as exc:  # torch.load raises anything from IndexError to RuntimeError on a non-checkpoint
        raise _not_a_checkpoint(path, exc) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise _not_a_checkpoint(path, TypeError(f"it holds a {type(data).__name__}, not a dict of tensors"))
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


class _Stub:
    """Stands in for classes pickled beside the weights (Lightning callbacks); keeps nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _StubbingUnpickler(pickle.Unpickler):
    _STUBBED = ("pytorch_lightning.", "lightning.", "lightning_fabric.")
    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("builtins", "set"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(self._STUBBED):
            return _Stub
        if (module, name) in self._ALLOWED or (module == "torch" and name.endswith("Storage")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


class _StubbingPickleModule:
    Unpickler = _StubbingUnpickler
    load = pickle.load
    __name__ = "dreambooth_stubbing_pickle"


def _load_with_stubs(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_StubbingPickleModule)
    except pickle.UnpicklingError as exc:
        if "refusing to load" not in str(exc):
            raise _not_a_checkpoint(path, exc) from None
        raise ModelFormatError(
            f"{path} holds code that is not a model's weights ({exc}).",
            "Use a .safetensors version of this checkpoint.",
        ) from None
    except Exception as exc:
        raise _not_a_checkpoint(path, exc) from None


def detect_family(keys: list[str], path: Path) -> str:
    """'sd1' for Stable Diffusion 1.x; a clear error for everything we cannot train yet or at all."""
    keyset = set(keys)
    if any(k.startswith(("lora_unet_", "lora_te_")) for k in keys):
        raise ModelFormatError(f"{path} is a LoRA, not a full checkpoint.", "Pick a full Stable Diffusion checkpoint.")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise ModelFormatError(
            f"{path} is an SDXL checkpoint; SDXL is not supported yet.", "Pick an SD 1.x checkpoint."
        )
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        raise ModelFormatError(
            f"{path} is an SD 2.x checkpoint; SD 2.x is not supported yet.", "Pick an SD 1.x checkpoint."
        )
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
            raise ModelFormatError(
                f"{path} holds a diffusers UNet alone, not a whole model.",
                "Pick the diffusers folder that holds it (with model_index.json), or a single file.",
            )
        raise ModelFormatError(
            f"{path} is not a Stable Diffusion checkpoint (no UNet weights in it).",
            "Pick a checkpoint from the web UI's models/Stable-diffusion folder.",
        )
    missing = [
        name
        for name, prefix in (("VAE", VAE_PREFIX), ("text encoder", TEXT_ENCODER_PREFIX))
        if not any(k.startswith(prefix) for k in keyset)
    ]
    if missing:
        raise ModelFormatError(
            f"{path} has no {' and no '.join(missing)} weights.",
            "Pick a complete checkpoint (UNet, VAE and text encoder in one file).",
        )
    return "sd1"


def fingerprint(path: Path) -> str:
    """A cheap identity of a file or folder: size, and hashes of its first and last MiB (files)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{size}".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(-(1 << 20), 2)
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def _not_a_checkpoint(path: Path, exc: BaseException) -> ModelFormatError:
    if path.exists() and path.stat().st_size == 0:
        return ModelFormatError(f"{path} is empty (0 bytes).", "The download was probably interrupted: get it again.")
    return ModelFormatError(
        f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}).",
        "Pick a .safetensors or .ckpt Stable Diffusion model; if it was downloaded, get it again.",
    )
