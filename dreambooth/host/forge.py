"""Stable Diffusion WebUI Forge (lllyasviel/stable-diffusion-webui-forge, main) as a
:class:`~dreambooth.host.base.WebUi`: what differs from the AUTOMATIC1111 web UI on top of
:class:`~dreambooth.host.webui.WebUiCommon`.

Forge keeps the web UI's ``modules`` for checkpoints, queue, progress and settings, but loads and moves models
with its own ``backend``: ``modules.sd_models.send_model_to_cpu`` and friends are empty there. So memory goes
through ``backend.memory_management`` (the models it holds on the GPU are unloaded before training and loaded
again after it, under Forge's own "GPU Weights" budget), and the checkpoint is switched the way Forge's own
dropdown does it (``modules_forge.main_entry.checkpoint_change``: it only records the choice, and Forge loads the
model lazily at the next generation, so a switch is safe while training holds the queue). The dropdown lists
names without hashes and has its own 🔄 (``forge_refresh_checkpoint``).

Every name used here and in ``host/webui.py`` is pinned in ``tests/forge_contract.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backend import memory_management
from modules import sd_models, shared
from modules_forge import main_entry

from ..errors import ConfigError
from .webui import WebUiCommon


class ForgeHost(WebUiCommon):
    """Forge's checkpoints, memory manager and progress state, through its own functions."""

    checkpoint_refresh_element = "forge_refresh_checkpoint"

    def __init__(self) -> None:
        super().__init__()
        self._unloaded: list[Any] = []
        """The models Forge held on the GPU before training (its ``ModelPatcher`` objects), to load back."""

    def checkpoint_titles(self) -> list[str]:
        """The names Forge's checkpoint dropdown lists (file names without paths when the user chose those)."""
        return list(shared.list_checkpoint_tiles(shared.opts.sd_checkpoint_dropdown_use_short))

    def unload_model(self) -> None:
        """Wait for Forge's queue, keep it, and unload every model from the GPU through Forge's memory manager
        (``unload_all_models``, then ``soft_empty_cache``), remembering which were there."""
        self._hold_queue()
        if not shared.opts.data.get("dreambooth_unload_model", True):
            return
        try:
            self._unloaded = [loaded.model for loaded in memory_management.current_loaded_models]
            memory_management.unload_all_models()
            memory_management.soft_empty_cache()
        except BaseException:
            self._unloaded = []
            self._release_queue()
            raise

    def reload_model(self) -> None:
        """Load the models Forge had on the GPU back (its ``load_models_gpu`` keeps to its memory settings);
        when another checkpoint was chosen meanwhile, hand Forge the new choice instead (it loads it at the next
        generation). Then free the queue."""
        try:
            models, self._unloaded = self._unloaded, []
            current = getattr(sd_models.model_data.sd_model, "sd_checkpoint_info", None)
            wanted = sd_models.select_checkpoint()
            if current is not None and wanted is not None and wanted.filename != current.filename:
                main_entry.refresh_model_loading_parameters()
            elif models:
                memory_management.load_models_gpu(models)
        finally:
            self._release_queue()

    def select_checkpoint(self, path: Path) -> str:
        """Make ``path`` Forge's checkpoint as its own dropdown would, and return the name the dropdown shows."""
        if shared.cmd_opts.freeze_settings:
            raise ConfigError("Forge's settings are frozen (--freeze-settings).",
                              "Pick the checkpoint in the checkpoint dropdown instead.")
        info = self._listed_info(path)
        title = info.short_title if shared.opts.sd_checkpoint_dropdown_use_short else info.name
        main_entry.checkpoint_change(title)
        return title
