"""The seam between the engine's front ends and a web UI: what the supervisor, the tab, the API and the
registration may ask of the program they run inside.

Hosts: the AUTOMATIC1111 web UI 1.10 (``host/a1111.py``), Stable Diffusion WebUI Forge (``host/forge.py``), both
built on what the two share (``host/webui.py``), and the standalone app (``host/standalone.py``).
``host/select.py`` picks the web UI's adapter by what is importable. Only those three web UI modules import the
web UI (``modules.*``, Forge's ``modules_forge.*`` and ``backend.*``); everything else talks to a :class:`Host`
or a :class:`WebUi` and never learns which one it has.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Host(Protocol):
    """What the supervisor, the tab and the HTTP API need from the program they run inside."""

    models_dir: Path
    """The web UI's ``models/`` folder (or the standalone app's)."""

    checkpoint_refresh_element: str | None
    """The HTML id of the button that re-lists the checkpoints in the page's txt2img dropdown (clicked by
    ``javascript/dreambooth.js`` on every open page after a save), or None where there is none."""

    def checkpoint_titles(self) -> list[str]:
        """The titles that the txt2img checkpoint dropdown lists, in its order."""
        ...

    def checkpoint_file(self, name: str) -> Path:
        """The file behind any name the host's own checkpoint lookup accepts (a title of
        :meth:`checkpoint_titles`, for the web UI also a title without its hash, the file name, the name without
        extension, a hash, a path under its checkpoint folder); ``KeyError`` when no checkpoint has it."""
        ...

    def refresh_checkpoints(self) -> None:
        """Re-list the checkpoint files so that newly written ones appear in the dropdown."""
        ...

    def refresh_loras(self) -> None:
        """Re-list the LoRA files so that newly written ones appear in the host's Lora tab (nothing where none)."""
        ...

    def unload_model(self) -> None:
        """Free the accelerator's memory before training, with the host's own functions."""
        ...

    def reload_model(self) -> None:
        """Bring the host's model back after training (honouring its memory flags)."""
        ...

    def job_started(self, title: str, total_steps: int) -> None:
        """Show a training job in the host's own progress state."""
        ...

    def job_progress(self, step: int, total: int, text: str) -> None:
        """Mirror one step of progress into the host's progress state."""
        ...

    def job_finished(self) -> None:
        """Clear the host's progress state."""
        ...

    def interrupt_requested(self) -> bool:
        """Whether the user pressed the host's own Interrupt button since :meth:`job_started`."""
        ...

    def select_checkpoint(self, path: Path) -> str:
        """Make the checkpoint at ``path`` the active one ("Use in txt2img") and return its title."""
        ...


@runtime_checkable
class WebUi(Host, Protocol):
    """A web UI that extensions plug into: a :class:`Host` plus the hooks that register the DreamBooth tab, its
    HTTP API and its settings section, and the web UI's settings and command line as the extension reads them."""

    checkpoints_dir: Path
    """The folder the web UI lists checkpoints from (``models/Stable-diffusion`` or ``--ckpt-dir``)."""
    loras_dir: Path
    """The folder its built-in Lora lists LoRA files from (``models/Lora`` or ``--lora-dir``)."""

    def on_ui_tabs(self, callback: Callable[[], list[tuple[Any, str, str]]]) -> None:
        """Call ``callback`` when the web UI builds its tabs; it returns ``[(blocks, title, elem_id)]``."""
        ...

    def on_app_started(self, callback: Callable[[Any, Any], None]) -> None:
        """Call ``callback(demo, app)`` once the web UI's FastAPI app exists."""
        ...

    def on_ui_settings(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the web UI collects its settings."""
        ...

    def add_setting(self, key: str, default: Any, label: str, section: tuple[str, str], *,
                    slider: tuple[float, float, float] | None = None,
                    onchange: Callable[[], None] | None = None) -> None:
        """Declare one setting in the web UI's settings page (a slider ``(minimum, maximum, step)`` or, for a
        bool default, a checkbox); call ``onchange`` after the user changed it."""
        ...

    def setting(self, key: str, default: Any) -> Any:
        """The current value of one of the web UI's settings, ``default`` when it has none."""
        ...

    def command_line(self, name: str) -> Any:
        """The value of a command-line flag of the web UI (``dreambooth_dir`` for ``--dreambooth-dir``), None
        when the web UI has no such flag."""
        ...

    def api_credentials(self) -> str | None:
        """The web UI's ``--api-auth`` (``user:password,…``), which its own HTTP API asks for, or None."""
        ...
