"""The AUTOMATIC1111 web UI (1.10.x) as a :class:`~dreambooth.host.base.WebUi`: what differs from Forge (the
dropdown's titles and choices, moving models out of VRAM and back, switching the active checkpoint) on top of
:class:`~dreambooth.host.webui.WebUiCommon`.

Every ``modules.*`` name used here and in ``host/webui.py`` is pinned, with its signature, in
``tests/host_contract.json``; ``tests/test_host_contract.py`` checks the pin against these files and against a
real web UI when ``SD_WEBUI_DIR`` names one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modules import devices, sd_models, shared

from ..errors import ConfigError
from .webui import WebUiCommon


class A1111Host(WebUiCommon):
    """The web UI's checkpoints, model memory and progress state, through its own functions."""

    def checkpoint_titles(self) -> list[str]:
        """The titles the txt2img checkpoint dropdown lists (short ones when the user chose those)."""
        return list(shared.list_checkpoint_tiles(shared.opts.sd_checkpoint_dropdown_use_short))

    def refresh_checkpoints(self) -> None:
        """Re-list the checkpoint files and give the quicksettings dropdown the new choices, so that pages
        loaded from now on list them (open pages click its 🔄 button through javascript/)."""
        super().refresh_checkpoints()
        component = (shared.settings_components or {}).get("sd_model_checkpoint")
        if component is not None:
            component.choices = self.checkpoint_titles()

    def unload_model(self) -> None:
        """Wait for the web UI's queue (a running generation finishes first), keep it, and move every loaded
        model to the CPU the way the web UI's own unload does (``--medvram``/``--lowvram`` aware)."""
        self._hold_queue()
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

    def select_checkpoint(self, path: Path) -> str:
        """Make ``path`` the active checkpoint and return its dropdown title. While training holds the queue
        the choice is only recorded; :meth:`reload_model` loads it when the run ends."""
        if shared.cmd_opts.freeze_settings:
            raise ConfigError("The web UI's settings are frozen (--freeze-settings).",
                              "Pick the checkpoint in the txt2img dropdown instead.")
        info = self._listed_info(path)
        if self._holding_queue:
            shared.opts.data["sd_model_checkpoint"] = info.title
        else:
            shared.opts.set("sd_model_checkpoint", info.title)
        shared.opts.save(shared.config_filename)
        return info.short_title if shared.opts.sd_checkpoint_dropdown_use_short else info.title


def _current_model() -> list[Any]:
    model = sd_models.model_data.sd_model
    return [model] if model is not None else []
