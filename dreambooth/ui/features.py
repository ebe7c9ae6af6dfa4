"""Optional pieces that some choices need, and why a choice is unavailable on this machine.

An option whose package is missing stays visible in the tab, marked unavailable with the reason, instead of
failing later inside the training process.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

OPTIONAL_CHOICES: dict[tuple[str, str], tuple[str, str]] = {
    ("optimizer", "adamw_8bit"): ("bitsandbytes", "pip install bitsandbytes (needs an NVIDIA GPU)"),
    ("attention", "xformers"): ("xformers", "install the xformers build that matches your torch"),
}
"""``(option, choice) -> (package it imports, how to get it)``."""


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
