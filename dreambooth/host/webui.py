"""What the AUTOMATIC1111 web UI 1.10 and Forge share, as one base class of their two adapters.

Forge keeps the web UI's ``modules`` package for everything but models and memory: its checkpoint list and
closest-checkpoint lookup, its queue lock, its progress state (``shared.state``), its settings and command line,
and its extension callbacks are the web UI's, name for name. So they live here once; ``host/a1111.py`` and
``host/forge.py`` add what differs (the dropdown's titles, moving models out of VRAM and back, switching the
active checkpoint). Every name used here is pinned in both ``tests/host_contract.json`` and
``tests/forge_contract.json``.

While a run trains, the supervisor holds the web UI's queue lock (taken in ``unload_model``, released in
``reload_model``): a txt2img request waits in the web UI's own queue instead of competing for the GPU, and the
model is never moved while a generation uses it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modules import call_queue, paths, script_callbacks, sd_models, shared


class WebUiCommon:
    """The checkpoint list, queue, progress state, settings, command line and callbacks of a web UI built on
    AUTOMATIC1111's ``modules`` (the web UI itself and Forge)."""

    checkpoint_refresh_element: str | None = "refresh_sd_model_checkpoint"

    def __init__(self) -> None:
        self.models_dir = Path(paths.models_path)
        self._holding_queue = False

    @property
    def checkpoints_dir(self) -> Path:
        """The folder the web UI lists checkpoints from."""
        return Path(sd_models.model_path)

    def checkpoint_file(self, name: str) -> Path:
        """The file behind any name the web UI's own closest-checkpoint lookup accepts (what ``/sdapi/v1/options``
        takes for ``sd_model_checkpoint``): a title with or without its hash, the file name, the name without
        extension, a short or full hash, a path under the checkpoint folder. A file put into the folder since the
        last listing (nobody pressed 🔄 yet) is found too: on a miss the list is read again once."""
        info = sd_models.get_closet_checkpoint_match(name)
        if info is None:
            self.refresh_checkpoints()
            info = sd_models.get_closet_checkpoint_match(name)
        if info is None:
            raise KeyError(name)
        return Path(info.filename)

    def refresh_checkpoints(self) -> None:
        """Re-list the checkpoint files (pages loaded from now on list them; open pages click the dropdown's 🔄
        through ``javascript/dreambooth.js``)."""
        shared.refresh_checkpoints()

    @property
    def loras_dir(self) -> Path:
        """The folder the web UI's built-in Lora lists LoRA files from (``--lora-dir``, default ``models/Lora``)."""
        return Path(getattr(shared.cmd_opts, "lora_dir", None) or Path(paths.models_path) / "Lora")

    def refresh_loras(self) -> None:
        """Re-list the LoRA files in the built-in Lora's list (its module ``networks``, when it is loaded)."""
        networks = sys.modules.get("networks")
        if networks is not None and hasattr(networks, "list_available_networks"):
            networks.list_available_networks()

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
        """Whether the web UI's Interrupt button (or ``/sdapi/v1/interrupt``) was pressed."""
        return bool(shared.state.interrupted)

    # ---- registration hooks and the web UI's settings (see base.WebUi) -----------------------------------

    def on_ui_tabs(self, callback: Callable[[], list[tuple[Any, str, str]]]) -> None:
        """Add a tab builder."""
        script_callbacks.on_ui_tabs(callback, name="dreambooth")

    def on_app_started(self, callback: Callable[[Any, Any], None]) -> None:
        """Add a callback that gets the FastAPI app."""
        script_callbacks.on_app_started(callback, name="dreambooth")

    def on_ui_settings(self, callback: Callable[[], None]) -> None:
        """Add a callback that declares settings."""
        script_callbacks.on_ui_settings(callback, name="dreambooth")

    def add_setting(self, key: str, default: Any, label: str, section: tuple[str, str], *,
                    slider: tuple[float, float, float] | None = None,
                    onchange: Callable[[], None] | None = None) -> None:
        """One option of the settings page, declared the web UI's way (``shared.OptionInfo``)."""
        component, args = None, None
        if slider is not None:
            import gradio as gr

            component, args = gr.Slider, {"minimum": slider[0], "maximum": slider[1], "step": slider[2]}
        shared.opts.add_option(key, shared.OptionInfo(default, label, component, args, onchange=onchange,
                                                      section=section))

    def setting(self, key: str, default: Any) -> Any:
        """A value of ``shared.opts``."""
        return shared.opts.data.get(key, default)

    def command_line(self, name: str) -> Any:
        """A flag of ``shared.cmd_opts`` (ours come from preload.py), None when absent."""
        return getattr(shared.cmd_opts, name, None)

    def api_credentials(self) -> str | None:
        """``--api-auth``."""
        return shared.cmd_opts.api_auth

    # ---- for the adapters ------------------------------------------------------------------------------------

    def _hold_queue(self) -> None:
        call_queue.queue_lock.acquire()
        self._holding_queue = True

    def _release_queue(self) -> None:
        if self._holding_queue:
            self._holding_queue = False
            call_queue.queue_lock.release()

    def _listed_info(self, path: Path) -> Any:
        """The web UI's ``CheckpointInfo`` of the file at ``path`` after a re-list; ``KeyError`` if unlisted."""
        self.refresh_checkpoints()
        target = Path(path).resolve()
        info = next((i for i in sd_models.checkpoints_list.values() if Path(i.filename).resolve() == target), None)
        if info is None:
            raise KeyError(str(path))
        return info
