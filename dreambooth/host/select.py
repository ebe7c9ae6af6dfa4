"""Which web UI the extension runs in, decided by what is importable: Forge has ``modules_forge`` beside the
web UI's ``modules``; the AUTOMATIC1111 web UI does not. The caller never learns which one it got."""

from __future__ import annotations

import importlib
import importlib.util

from .base import WebUi

FORGE_MARKER = "modules_forge"
"""A top-level package only Forge has (its ``main_entry``, ``main_thread``, …)."""


def running_in_forge() -> bool:
    """Whether this process's web UI is Forge (``modules_forge`` can be imported)."""
    return importlib.util.find_spec(FORGE_MARKER) is not None


def web_ui_host() -> WebUi:
    """The adapter of the web UI this process runs in: Forge's when ``modules_forge`` is importable, else the
    AUTOMATIC1111 web UI's. Only the chosen adapter's module is imported."""
    module = "forge" if running_in_forge() else "a1111"
    adapter = importlib.import_module(f"{__package__}.{module}")
    return adapter.ForgeHost() if module == "forge" else adapter.A1111Host()
