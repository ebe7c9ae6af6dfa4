"""A host without a web UI, for ``python -m dreambooth ui``: checkpoints are the files under
``<models>/Stable-diffusion``, there is no model in memory to unload, and progress lives only in the tab.
"""

from __future__ import annotations

import threading
from pathlib import Path

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


class StandaloneHost:
    """The :class:`~dreambooth.host.base.Host` of the standalone app."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)
        self.checkpoints_dir = self.models_dir / "Stable-diffusion"
        self.selected: Path | None = None
        """The checkpoint last picked with "Use in txt2img" (there is no txt2img here; it is only remembered)."""
        self.job: tuple[str, int, int, str] | None = None
        """``(title, step, total, text)`` of the running job, for logs and tests."""
        self._lock = threading.Lock()
        self._titles: dict[str, Path] = {}
        self.refresh_checkpoints()

    def checkpoint_titles(self) -> list[str]:
        """Paths of the checkpoint files relative to ``<models>/Stable-diffusion``, '/'-separated, sorted."""
        with self._lock:
            return list(self._titles)

    def checkpoint_file(self, title: str) -> Path:
        """The file behind a title; ``KeyError`` for an unknown one."""
        with self._lock:
            return self._titles[title]

    def refresh_checkpoints(self) -> None:
        """Re-scan ``<models>/Stable-diffusion``."""
        found: dict[str, Path] = {}
        if self.checkpoints_dir.is_dir():
            files = (
                p for p in self.checkpoints_dir.rglob("*") if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file()
            )
            for path in sorted(files, key=lambda p: p.relative_to(self.checkpoints_dir).as_posix().lower()):
                found[path.relative_to(self.checkpoints_dir).as_posix()] = path
        with self._lock:
            self._titles = found

    def unload_model(self) -> None:
        """Nothing is loaded here."""

    def reload_model(self) -> None:
        """Nothing to bring back."""

    def job_started(self, title: str, total_steps: int) -> None:
        """Remember the job (the tab shows progress itself)."""
        self.job = (title, 0, total_steps, "")

    def job_progress(self, step: int, total: int, text: str) -> None:
        """Remember the job's progress."""
        title = self.job[0] if self.job else ""
        self.job = (title, step, total, text)

    def job_finished(self) -> None:
        """Forget the job."""
        self.job = None

    def interrupt_requested(self) -> bool:
        """There is no Interrupt button outside the tab."""
        return False

    def select_checkpoint(self, path: Path) -> str:
        """Remember ``path`` and return its title (there is no txt2img to switch)."""
        self.refresh_checkpoints()
        self.selected = Path(path)
        try:
            return Path(path).resolve().relative_to(self.checkpoints_dir.resolve()).as_posix()
        except ValueError:
            return Path(path).name
