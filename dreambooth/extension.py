"""DreamBooth inside a web UI: registers the tab, the HTTP API and the settings section through the web UI's
callbacks, whichever web UI it is (``host.select`` picks the adapter; nothing here knows which one it got).

Called by ``scripts/dreambooth.py``; the adapters in ``dreambooth/host/`` only adapt, this module only
registers and delegates.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from . import api
from .host import dependencies
from .host.base import WebUi
from .host.select import web_ui_host
from .supervisor import Supervisor

TAB_TITLE = "DreamBooth"
TAB_ID = "dreambooth"
SETTINGS_SECTION = ("dreambooth", "DreamBooth")
CANCEL_TIMEOUT_DEFAULT = 60

_supervisor: Supervisor | None = None


def supervisor() -> Supervisor:
    """The one supervisor of this web UI process (it outlives a "Reload UI", which re-runs scripts/)."""
    global _supervisor
    if _supervisor is None:
        host = web_ui_host()
        folder = host.command_line("dreambooth_dir") or host.models_dir / "dreambooth"
        python = host.command_line("dreambooth_python") or sys.executable
        _supervisor = Supervisor(host, Path(folder), host.checkpoints_dir, python=python, loras_dir=host.loras_dir)
        _apply_settings()
    return _supervisor


def web_ui() -> WebUi:
    """The adapter of the web UI this process runs in (the supervisor's host)."""
    host = supervisor().host
    assert isinstance(host, WebUi)
    return host


def ui_tabs() -> list[tuple[Any, str, str]]:
    """The DreamBooth tab; when a package it needs is missing, a tab that says which and how to add it."""
    import gradio as gr

    missing = dependencies.missing_requirements()
    if missing:
        with gr.Blocks(analytics_enabled=False) as blocks:
            gr.Markdown(dependencies.describe(missing))
        return [(blocks, TAB_TITLE, TAB_ID)]
    from .ui.tab import build_tab

    return [(build_tab(supervisor(), supervisor().host), TAB_TITLE, TAB_ID)]


def app_started(_demo: Any, app: Any) -> None:
    """Mount the page's checkpoint watch (every open page lists new checkpoints) and the HTTP API under
    /dreambooth/v1, behind the web UI's --api-auth when it is set."""
    api.mount_page_routes(app, supervisor())
    if web_ui().command_line("dreambooth_no_api"):
        return
    api.mount(app, supervisor(), api.parse_credentials(web_ui().api_credentials()))


def ui_settings() -> None:
    """The "DreamBooth" section of the web UI's settings."""
    host = web_ui()
    host.add_setting("dreambooth_unload_model", True, "Move the web UI's model out of VRAM while DreamBooth trains",
                     SETTINGS_SECTION)
    host.add_setting("dreambooth_cancel_timeout", CANCEL_TIMEOUT_DEFAULT,
                     "Seconds a cancelled training may take to stop by itself before it is terminated",
                     SETTINGS_SECTION, slider=(5, 600, 5), onchange=_apply_settings)


def _apply_settings() -> None:
    running = supervisor()
    running.cancel_timeout = float(running.host.setting("dreambooth_cancel_timeout", CANCEL_TIMEOUT_DEFAULT))


def register() -> None:
    """Register the tab, the API and the settings with the web UI (called by scripts/dreambooth.py)."""
    host = web_ui_host()
    host.on_ui_tabs(ui_tabs)
    host.on_app_started(app_started)
    host.on_ui_settings(ui_settings)
