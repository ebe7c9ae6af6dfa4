"""The seam between the engine's front ends and a web UI: what the supervisor and the tab may ask of a host.

A host is the AUTOMATIC1111 web UI (``host/a1111.py``, the only module that imports ``modules.*``) or the
standalone app (``host/standalone.py``). Everything else talks to it through this protocol only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Host(Protocol):
    """What the supervisor, the tab and the HTTP API need from the program they run inside."""

    models_dir: Path
    """The web UI's ``models/`` folder (or the standalone app's)."""

    def checkpoint_titles(self) -> list[str]:
        """The titles that the txt2img checkpoint dropdown lists, in its order."""
        ...

    def checkpoint_file(self, title: str) -> Path:
        """The file behind a title of :meth:`checkpoint_titles`; ``KeyError`` when no checkpoint has it."""
        ...

    def refresh_checkpoints(self) -> None:
        """Re-list the checkpoint files so that newly written ones appear in the dropdown."""
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
