"""Optional pieces that some choices need, and why a choice is unavailable on this machine.

An option whose package is missing stays visible in the tab, marked unavailable with the reason, instead of
failing later inside the training process.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

OPTIONAL_CHOICES: dict[tuple[str, str], tuple[str, str]] = {
    ("attention", "xformers"): ("xformers", "install the xformers build that matches your torch"),
}
"""``(option, choice) -> (package it imports, how to get it)``: choices that always need the package.

``optimizer: adamw_8bit`` is not one of them: with bf16 weights or the fused optimizer step it runs on this
extension's own 8-bit AdamW on any device, and only with fp32 weights on bitsandbytes (see
:func:`choice_problems`). Forge installs bitsandbytes only where it finds a CUDA GPU."""


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def unavailable_choices(installed: Callable[[str], bool] = _installed) -> dict[str, dict[str, str]]:
    """``{option: {choice: reason}}`` for each choice whose package is not installed here."""
    missing: dict[str, dict[str, str]] = {}
    for (name, choice), (package, remedy) in OPTIONAL_CHOICES.items():
        if not installed(package):
            missing.setdefault(name, {})[choice] = f"{package} is not installed ({remedy})"
    return missing


def _gpu_has_bf16() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    except Exception:  # no torch, or a CUDA build without a driver
        return False


def choice_problems(config: Any, installed: Callable[[str], bool] = _installed,
                    gpu_has_bf16: Callable[[], bool] = _gpu_has_bf16) -> list[str]:
    """What stops ``config`` (a ``TrainConfig``) from training here because of a choice that needs a package
    only together with other options: ``adamw_8bit`` with weights that stay in fp32 ('weights_dtype' fp32, or
    'auto' where no CUDA GPU with bf16 trains, as the engine decides) and no fused optimizer step goes through
    bitsandbytes. Each problem says what to change."""
    problems = []
    if config.optimizer == "adamw_8bit" and not config.optimizer_in_backward and not installed("bitsandbytes"):
        bf16 = config.weights_dtype == "bf16" or (
            config.weights_dtype == "auto" and config.device != "cpu" and gpu_has_bf16()
        )
        if not bf16:
            problems.append(
                "'optimizer' adamw_8bit with fp32 weights needs bitsandbytes, which is not installed: set 'Weight "
                "precision' (weights_dtype) to bf16 to use this extension's own 8-bit AdamW (any device), or pick "
                "adamw, or install bitsandbytes (NVIDIA GPU)."
            )
    return problems
