"""Optional pieces that some choices need, and why a choice is unavailable on this machine.

An option whose package is missing stays visible in the tab, marked unavailable with the reason, instead of
failing later inside the training process. The optimizers say what they need in their own table
(``train/optimizers.py``): one is unavailable only when none of its paths runs here (AdamW 8-bit runs on bf16
weights without bitsandbytes, so it stays).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

from ..train.optimizers import OPTIMIZERS, OptimizerSpec, unavailable_reason

OPTIONAL_CHOICES: dict[tuple[str, str], tuple[str, str]] = {
    ("attention", "xformers"): ("xformers", "install the xformers build that matches your torch"),
}
"""``(option, choice) -> (package it imports, how to get it)``, for options other than the optimizer."""


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def unavailable_choices(
    installed: Callable[[str], bool] = _installed, optimizers: Mapping[str, OptimizerSpec] = OPTIMIZERS
) -> dict[str, dict[str, str]]:
    """``{option: {choice: reason}}`` for each choice whose package is not installed here (an optimizer: none of
    whose paths runs here)."""
    missing: dict[str, dict[str, str]] = {}
    for (name, choice), (package, remedy) in OPTIONAL_CHOICES.items():
        if not installed(package):
            missing.setdefault(name, {})[choice] = f"{package} is not installed ({remedy})"
    for spec in optimizers.values():
        reason = unavailable_reason(spec, installed)
        if reason:
            missing.setdefault("optimizer", {})[spec.name] = reason
    return missing


def _gpu_has_bf16() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    except Exception:  # no torch, or a CUDA build without a driver
        return False


def choice_problems(config: Any, installed: Callable[[str], bool] | None = None,
                    gpu_has_bf16: Callable[[], bool] | None = None) -> list[str]:
    """What stops ``config`` (a ``TrainConfig``) from training here because its optimizer needs a package on the
    path these settings take (the optimizer table's ``needs``): the flat path with bf16 weights ('weights_dtype'
    bf16, or 'auto' where a CUDA GPU with bf16 trains, as the engine decides) or the fused optimizer step, else
    torch's optimizer on fp32 weights. Each problem says what to change."""
    installed, gpu_has_bf16 = installed or _installed, gpu_has_bf16 or _gpu_has_bf16
    spec = OPTIMIZERS[config.optimizer]
    bf16 = config.weights_dtype == "bf16" or (
        config.weights_dtype == "auto" and config.device != "cpu" and spec.runs_on("flat") and gpu_has_bf16()
    )
    path = "flat" if bf16 or config.optimizer_in_backward else "torch"
    package, remedy = spec.needs.get(path, (None, ""))
    if package is None or installed(package):
        return []
    alternatives = [p for p in spec.paths if p != path and p not in spec.needs]
    switch = " set 'Weight precision' (weights_dtype) to bf16 (this extension's own kernel, any device), or" \
        if "flat" in alternatives else ""
    return [f"'optimizer' {spec.name} with fp32 weights needs {package}, which is not installed:{switch} pick "
            f"another optimizer, or install it ({remedy})."]
