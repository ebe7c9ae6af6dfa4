"""The AUTOMATIC1111 web UI (1.10.x) as a :class:`~dreambooth.host.base.Host`, and the callbacks that add
DreamBooth to it: the tab, the HTTP API and a settings section.

This is the only module that imports ``modules.*``. Every host name it uses is pinned, with its signature, in
``tests/host_contract.json``; ``tests/test_host_contract.py`` checks the pin against this file and against a
real web UI when ``SD_WEBUI_DIR`` is set.

While a run trains, the supervisor holds the host's queue lock (taken in :meth:`A1111Host.unload_model`,
released in :meth:`A1111Host.reload_model`): a txt2img request waits in the host's own queue instead of
competing for the GPU, and the model is never moved while a generation uses it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from modules import call_queue, devices, paths, script_callbacks, sd_models, shared

from .. import api
from ..errors import ConfigError
from ..supervisor import Supervisor
from . import dependencies

TAB_TITLE = "DreamBooth"
TAB_ID = "dreambooth"
SETTINGS_SECTION = ("dreambooth", "DreamBooth")


class A1111Host:
    """The web UI's checkpoints, model memory and progress state, through its own functions."""

    def __init__(self) -> None:
        self.models_dir = Path(paths.models_path)
        self._holding_queue = False

    def checkpoint_titles(self) -> list[str]:
        """The titles the txt2img checkpoint dropdown lists (short ones when the user chose those)."""
        return list(shared.list_checkpoint_tiles(shared.opts.sd_checkpoint_dropdown_use_short))

    def checkpoint_file(self, title: str) -> Path:
        """The file behind a dropdown title (any of the host's aliases works)."""
        info = sd_models.get_closet_checkpoint_match(title)
        if info is None:
            raise KeyError(title)
        return Path(info.filename)

    def refresh_checkpoints(self) -> None:
        """Re-list the checkpoint files and give the quicksettings dropdown the new choices, so that pages
        loaded from now on list them (open pages click its 🔄 button through javascript/)."""
        shared.refresh_checkpoints()
        component = (shared.settings_components or {}).get("sd_model_checkpoint")
        if component is not None:
            component.choices = self.checkpoint_titles()

    def unload_model(self) -> None:
        """Wait for the host's queue (a running generation finishes first), keep it, and move every loaded
        model to the CPU the way the host's own unload does (``--medvram``/``--lowvram`` aware)."""
        call_queue.queue_lock.acquire()
        self._holding_queue = True
        if not shared.opts.data.get("dreambooth_unload_model", True):
            return
        try:
            for model in list(sd_models.model_data.loaded_sd_models) or _current_model():
                sd_models.send_model_to_cpu(model)
            devices.torch_gc()
        except BaseException:
            self._release_queue()
            raise

    def reload_model(self) -> None:
        """Bring the active model back to the GPU (loading the one chosen meanwhile), then free the queue."""
        try:
            model = sd_models.model_data.sd_model
            if model is not None:
                wanted = sd_models.select_checkpoint()
                if wanted.filename != model.sd_checkpoint_info.filename:
                    sd_models.reload_model_weights(model, wanted)
                else:
                    sd_models.send_model_to_device(model)
        finally:
            self._release_queue()

    def job_started(self, title: str, total_steps: int) -> None:
        """Show the run in ``shared.state`` (its Interrupt flag is cleared by ``begin``)."""
        shared.state.begin(job=title)
        shared.state.job_count = 1
        shared.state.sampling_steps = total_steps
        shared.state.textinfo = title

    def job_progress(self, step: int, total: int, text: str) -> None:
        """Mirror one step into ``shared.state``."""
        shared.state.sampling_step = step
        shared.state.sampling_steps = total
        shared.state.textinfo = text

    def job_finished(self) -> None:
        """End the job in ``shared.state``."""
        shared.state.end()

    def interrupt_requested(self) -> bool:
        """Whether the host's Interrupt button (or ``/sdapi/v1/interrupt``) was pressed."""
        return bool(shared.state.interrupted)

    def select_checkpoint(self, path: Path) -> str:
        """Make ``path`` the active checkpoint and return its dropdown title. While training holds the queue
        the choice is only recorded; :meth:`reload_model` loads it when the run ends."""
        if shared.cmd_opts.freeze_settings:
            raise ConfigError("The web UI's settings are frozen (--freeze-settings).",
                              "Pick the checkpoint in the txt2img dropdown instead.")
        self.refresh_checkpoints()
        target = Path(path).resolve()
        info = next((i for i in sd_models.checkpoints_list.values() if Path(i.filename).resolve() == target), None)
        if info is None:
            raise KeyError(str(path))
        if self._holding_queue:
            shared.opts.data["sd_model_checkpoint"] = info.title
        else:
            shared.opts.set("sd_model_checkpoint", info.title)
        shared.opts.save(shared.config_filename)
        return info.short_title if shared.opts.sd_checkpoint_dropdown_use_short else info.title

    def _release_queue(self) -> None:
        if self._holding_queue:
            self._holding_queue = False
            call_queue.queue_lock.release()


def _current_model() -> list[Any]:
    model = sd_models.model_data.sd_model
    return [model] if model is not None else []


_supervisor: Supervisor | None = None


def supervisor() -> Supervisor:
    """The one supervisor of this web UI process (it outlives a "Reload UI", which re-runs scripts/)."""
    global _supervisor
    if _supervisor is None:
        host = A1111Host()
        folder = getattr(shared.cmd_opts, "dreambooth_dir", None) or host.models_dir / "dreambooth"
        python = getattr(shared.cmd_opts, "dreambooth_python", None) or sys.executable
        _supervisor = Supervisor(host, Path(folder), Path(sd_models.model_path), python=python)
        _supervisor.cancel_timeout = float(shared.opts.data.get("dreambooth_cancel_timeout", 60))
    return _supervisor


def ui_tabs() -> list[tuple[Any, str, str]]:
    """The DreamBooth tab; when a package it needs is missing, a tab that says which and how to add it."""
    import gradio as gr

    missing = dependencies.missing_requirements()
    if missing:
        with gr.Blocks(analytics_enabled=False) as blocks:
            gr.Markdown(dependencies.describe(missing))
        return [(blocks, TAB_TITLE, TAB_ID)]
    from ..ui.tab import build_tab

    return [(build_tab(supervisor(), supervisor().host), TAB_TITLE, TAB_ID)]


def app_started(_demo: Any, app: Any) -> None:
    """Mount the HTTP API under /dreambooth/v1, behind the host's --api-auth when it is set."""
    if getattr(shared.cmd_opts, "dreambooth_no_api", False):
        return
    api.mount(app, supervisor(), api.parse_credentials(shared.cmd_opts.api_auth))


def ui_settings() -> None:
    """The "DreamBooth" section of the web UI's settings."""
    import gradio as gr

    shared.opts.add_option("dreambooth_unload_model", shared.OptionInfo(
        True, "Move the web UI's model out of VRAM while DreamBooth trains", section=SETTINGS_SECTION))
    shared.opts.add_option("dreambooth_cancel_timeout", shared.OptionInfo(
        60, "Seconds a cancelled training may take to stop by itself before it is terminated", gr.Slider,
        {"minimum": 5, "maximum": 600, "step": 5}, onchange=_apply_settings, section=SETTINGS_SECTION))


def _apply_settings() -> None:
    supervisor().cancel_timeout = float(shared.opts.data.get("dreambooth_cancel_timeout", 60))


def register() -> None:
    """Register the tab, the API and the settings with the web UI (called by scripts/dreambooth.py)."""
    script_callbacks.on_ui_tabs(ui_tabs, name="dreambooth")
    script_callbacks.on_app_started(app_started, name="dreambooth")
    script_callbacks.on_ui_settings(ui_settings, name="dreambooth")
