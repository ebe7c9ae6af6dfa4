"""Optional pieces that some choices need, and why a choice is unavailable on this machine.

An option whose package is missing stays visible in the tab, marked unavailable with the reason, instead of
failing later inside the training process. The optimizers say what they need in their own table
(``train/optimizers.py``): one is unavailable only when none of its paths runs here (AdamW 8-bit runs on bf16
weights without bitsandbytes, so it stays).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping

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
